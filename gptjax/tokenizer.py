"""Tokenizers behind one small interface: text <-> int32 ids, plus an end-of-text id.

  char           one id per character of the training text (vocabulary saved in the workdir)
  byte           UTF-8 bytes + end-of-text: every string encodes, nothing to train
  bpe            GPT-2's byte-level BPE: Hugging Face `tokenizers` from local files
                 (tokenizer.json, or vocab.json + merges.txt), else tiktoken's "gpt2"
  sentencepiece  a SentencePiece model (`python -m gptjax.train_tokenizer` makes one)

End of text is GPT-2's: documents are joined by one `<|endoftext|>` id, which decodes to
that string (and, for bpe and sentencepiece, encodes from it). A workdir's tokenizer.json
holds the whole tokenizer (model files embedded), so a run or an export is self-contained.
"""

import abc
import base64
import io
import json
import os
import re

import numpy as np

from gptjax import storage
from gptjax.errors import UserError

EOT = "<|endoftext|>"


class UnknownCharacter(UserError):
  """Text with a character the vocabulary lacks. `fix` suits training data; callers that
  encode something else (a prompt, a chat message) say their own fix with `problem`."""

  def __init__(self, char: str, vocabulary: str, fix: str):
    self.char, self.problem = (
      char,
      f"character {char!r} (U+{ord(char):04X}) is not in the {vocabulary}",
    )
    super().__init__(f"{self.problem}; {fix}")


class Tokenizer(abc.ABC):
  """Maps text to ids and back. `eot_id` separates documents (GPT-2 style)."""

  kind: str
  vocab_size: int
  eot_id: int

  @abc.abstractmethod
  def encode(self, text: str) -> np.ndarray:
    """Returns int32 ids, shape (len,). Raises UserError for text it cannot encode."""

  @abc.abstractmethod
  def decode(self, ids) -> str:
    """Inverse of encode; special ids render as their names."""

  @abc.abstractmethod
  def to_dict(self) -> dict:
    """What `from_dict` needs to rebuild this tokenizer (JSON-serialisable)."""

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    """encode for many texts (library tokenizers override it to run in parallel)."""
    return [self.encode(t) for t in texts]

  def token_bytes(self, token: int) -> bytes:
    """The raw bytes of one token (OpenAI's logprobs `bytes`): a token holding part of a
    character has that part, which decode([token]) cannot show."""
    return self.decode([token]).encode("utf-8")


class CharTokenizer(Tokenizer):
  """One id per character seen in the training text; EOT is the last id."""

  kind = "char"

  def __init__(self, chars):
    self.chars = sorted(set(chars))
    self._stoi = {c: i for i, c in enumerate(self.chars)}
    self.eot_id = len(self.chars)
    self.vocab_size = len(self.chars) + 1

  @classmethod
  def train(cls, texts) -> "CharTokenizer":
    chars = set()
    for text in texts:
      chars.update(text)
    if not chars:
      raise UserError("cannot build a char vocabulary from empty training text")
    return cls(chars)

  def encode(self, text):
    try:
      return np.fromiter(map(self._stoi.__getitem__, text), np.int32, count=len(text))
    except KeyError as e:
      raise UnknownCharacter(
        e.args[0],
        "char vocabulary built from the training text",
        "remove it or use --config.data.tokenizer=byte",
      ) from None

  def decode(self, ids):
    return "".join(self.chars[i] if i < self.eot_id else EOT for i in np.asarray(ids).tolist())

  def to_dict(self):
    return {"kind": self.kind, "chars": "".join(self.chars)}


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes 0..255, then EOT = 256: every string encodes, nothing to train."""

  kind = "byte"
  eot_id = 256
  vocab_size = 257

  def encode(self, text):
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

  def decode(self, ids):
    out, run = [], bytearray()
    for i in np.asarray(ids).tolist():
      if i < 256:
        run.append(i)
      else:
        out.append(run.decode("utf-8", errors="replace"))
        out.append(EOT)
        run = bytearray()
    out.append(run.decode("utf-8", errors="replace"))
    return "".join(out)

  def token_bytes(self, token):
    return bytes([token]) if token < 256 else EOT.encode()

  def to_dict(self):
    return {"kind": self.kind}


class BPETokenizer(Tokenizer):
  """GPT-2's byte-level BPE, through Hugging Face `tokenizers` or tiktoken (same ids)."""

  kind = "bpe"

  @classmethod
  def train(cls, texts, vocab_size: int) -> "BPETokenizer":
    """GPT-2's byte-level BPE scheme on new text; <|endoftext|> is id 0."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT])
    return cls(hf_json=bpe.to_str())

  def __init__(self, hf_json: str | None = None, tiktoken_name: str | None = None):
    self.hf_json, self.tiktoken_name = hf_json, tiktoken_name
    if tiktoken_name:
      self._tt = _tiktoken(tiktoken_name)
      self.vocab_size, self.eot_id = self._tt.n_vocab, self._tt.eot_token
      return
    import tokenizers as hf_tokenizers

    self._hf = hf_tokenizers.Tokenizer.from_str(hf_json)
    self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
    self.eot_id = self._hf.token_to_id(EOT)
    if self.eot_id is None:
      raise UserError(
        f"the BPE vocabulary has no {EOT} token; use GPT-2's files or train "
        "one with python -m gptjax.train_tokenizer --kind=bpe"
      )

  @classmethod
  def from_path(cls, path: str) -> "BPETokenizer":
    """A tokenizer.json file, or a directory with tokenizer.json or vocab.json + merges.txt."""
    path = os.path.expanduser(path)
    json_file = storage.join(path, "tokenizer.json") if storage.isdir(path) else path
    vocab, merges = (storage.join(path, f) for f in ("vocab.json", "merges.txt"))
    if storage.isfile(json_file):
      return cls(hf_json=storage.read_text(json_file))
    if storage.isfile(vocab) and storage.isfile(merges):
      from tokenizers import ByteLevelBPETokenizer

      bpe = ByteLevelBPETokenizer(
        *map(storage.local_copy, (vocab, merges))
      )  # GPT-2's pre-tokenizer and decoder
      if bpe.token_to_id(EOT) is not None:
        bpe.add_special_tokens([EOT])  # keeps its id; "<|endoftext|>" in text maps to it
      return cls(hf_json=bpe.to_str())
    raise UserError(
      f"no BPE tokenizer files at {path!r}: pass --config.data.tokenizer_path="
      "a tokenizer.json, or a directory with tokenizer.json or vocab.json + "
      "merges.txt"
    )

  def encode(self, text):
    return self.encode_batch([text])[0]

  def encode_batch(self, texts):
    if self.tiktoken_name:
      return [
        np.asarray(ids, np.int32) for ids in self._tt.encode_batch(texts, allowed_special="all")
      ]
    return [np.asarray(e.ids, np.int32) for e in self._hf.encode_batch(texts)]

  def decode(self, ids):
    ids = np.asarray(ids).tolist()
    if self.tiktoken_name:
      return self._tt.decode(ids)
    return self._hf.decode(ids, skip_special_tokens=False)

  def token_bytes(self, token):
    if self.tiktoken_name:
      return self._tt.decode_single_token_bytes(token)
    byte_level = type(self._hf.decoder).__name__ == "ByteLevel"
    if not byte_level or token in self._hf.get_added_tokens_decoder():  # special: its name
      return super().token_bytes(token)
    return bytes(_BYTE_OF[c] for c in self._hf.id_to_token(token) or "")  # past the vocab: b""

  def to_dict(self):
    if self.tiktoken_name:
      return {"kind": self.kind, "tiktoken": self.tiktoken_name}
    return {"kind": self.kind, "tokenizer_json": self.hf_json}


# Byte-level BPE (GPT-2's) writes each byte as a printable character: the printable Latin-1
# bytes as themselves, the other 68 as U+0100 on, in byte order. Character -> byte:
_PRINTABLE = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
_BYTE_OF = {chr(b): b for b in _PRINTABLE} | {
  chr(0x100 + i): b for i, b in enumerate(b for b in range(256) if b not in _PRINTABLE)
}


def _tiktoken(name: str):
  import tiktoken

  try:
    return tiktoken.get_encoding(name)
  except Exception as e:  # offline, no cached files: tiktoken's own error is a long traceback
    reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
    raise UserError(
      f"cannot load tiktoken's {name!r} BPE files ({reason}); offline, pass "
      "--config.data.tokenizer_path=DIR holding GPT-2's tokenizer.json or "
      "vocab.json + merges.txt"
    ) from None


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model; its `<|endoftext|>` piece is the end-of-text id."""

  kind = "sentencepiece"

  def __init__(self, model_proto: bytes, source: str = "the SentencePiece model"):
    import sentencepiece as spm

    self.model_proto = model_proto
    try:
      self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    except Exception as e:
      raise UserError(
        f"{source} is not a SentencePiece model ({e}); train one with "
        "python -m gptjax.train_tokenizer --kind=sentencepiece"
      ) from None
    self.vocab_size = self._sp.get_piece_size()
    self.eot_id = self._sp.piece_to_id(EOT)
    self._bytes = self._sp.piece_to_id("<0x00>") != self._sp.unk_id()  # byte fallback
    if self.eot_id == self._sp.unk_id():
      raise UserError(
        f"{source} has no {EOT} piece; train it with python -m "
        "gptjax.train_tokenizer (or add the piece as a user-defined symbol)"
      )

  @classmethod
  def from_file(cls, path: str) -> "SentencePieceTokenizer":
    try:
      with storage.open(os.path.expanduser(path), "rb") as f:
        return cls(f.read(), source=path)
    except FileNotFoundError:
      raise UserError(
        f"SentencePiece model {path!r} not found; train one with python -m "
        "gptjax.train_tokenizer --kind=sentencepiece, or fix "
        "--config.data.tokenizer_path"
      ) from None

  @classmethod
  def train(cls, texts, vocab_size: int, model_type: str = "bpe") -> "SentencePieceTokenizer":
    """Trains on an iterable of texts (split into lines, as SentencePiece wants them).

    Lossless for language modelling: no normalisation, whitespace kept, newline a piece of
    its own, and byte fallback so any string encodes.
    """

    import sentencepiece as spm

    lines = (line for text in texts for line in text.split("\n") if line)
    model = io.BytesIO()
    try:
      spm.SentencePieceTrainer.train(
        sentence_iterator=lines,
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        user_defined_symbols=[EOT, "\n"],
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        character_coverage=0.9999,
        input_sentence_size=2_000_000,
        shuffle_input_sentence=True,
        bos_id=-1,
        eos_id=-1,
        unk_id=0,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
      )
    except RuntimeError as e:
      reason = str(e).split("] ")[-1]
      if need := re.search(r"required_chars\. (\d+) vs (\d+)", reason):  # not its own flag's name
        reason = f"a vocabulary of {need[1]} is below the {need[2]} ids this text's characters need; raise it"
      raise UserError(f"SentencePiece training failed: {reason}") from None
    return cls(model.getvalue())

  def encode(self, text):
    return self.encode_batch([text])[0]

  def encode_batch(self, texts):
    out = [np.asarray(ids, np.int32) for ids in self._sp.encode(list(texts))]
    if not self._bytes:  # without byte fallback an unknown character would become <unk>
      for text, ids in zip(texts, out):
        if (ids == self._sp.unk_id()).any():
          pieces = self._sp.encode(text, out_type="immutable_proto").pieces
          ch = next(p.surface for p in pieces if p.id == self._sp.unk_id())[:1]
          raise UnknownCharacter(
            ch,
            "SentencePiece vocabulary (trained without byte fallback)",
            "remove it or train with python -m gptjax.train_tokenizer",
          )
    return out

  def decode(self, ids):
    return self._sp.decode(np.asarray(ids).tolist())

  def token_bytes(self, token):
    piece = self._sp.id_to_piece(token)
    if self._sp.is_byte(token):  # byte fallback: <0xNN>
      return bytes([int(piece[3:5], 16)])
    if self._sp.is_control(token) or self._sp.is_unknown(token):
      return super().token_bytes(token)
    return piece.replace("\u2581", " ").encode("utf-8")  # its word-start mark is a space

  def to_dict(self):
    return {"kind": self.kind, "model": base64.b64encode(self.model_proto).decode("ascii")}


def from_dict(d: dict) -> Tokenizer:
  kind = d.get("kind")
  if kind == "char":
    return CharTokenizer(d["chars"])
  if kind == "byte":
    return ByteTokenizer()
  if kind == "bpe":
    return BPETokenizer(d.get("tokenizer_json"), d.get("tiktoken"))
  if kind == "sentencepiece":
    return SentencePieceTokenizer(base64.b64decode(d["model"]))
  raise UserError(f"unknown tokenizer kind {kind!r}; expected one of {', '.join(KINDS)}")


KINDS = ("char", "byte", "bpe", "sentencepiece")


def build(kind: str, path: str | None, train_texts) -> Tokenizer:
  """The tokenizer a config asks for (train_texts: a callable giving the training texts,
  used only by char)."""
  if kind == "char":
    return CharTokenizer.train(train_texts())
  if kind == "byte":
    return ByteTokenizer()
  if kind == "bpe":
    return BPETokenizer.from_path(path) if path else BPETokenizer(tiktoken_name="gpt2")
  if kind == "sentencepiece":
    if not path:
      raise UserError(
        "data.tokenizer='sentencepiece' needs --config.data.tokenizer_path="
        "MODEL; make one with python -m gptjax.train_tokenizer "
        "--kind=sentencepiece"
      )
    return SentencePieceTokenizer.from_file(path)
  raise UserError(f"unknown tokenizer {kind!r}; use one of {', '.join(KINDS)}")


def save(tokenizer: Tokenizer, path: str) -> None:
  storage.write_text(path, json.dumps(tokenizer.to_dict()))  # whole: never half a vocabulary


def load(path: str) -> Tokenizer:
  try:
    return from_dict(json.loads(storage.read_text(path)))
  except FileNotFoundError:
    raise UserError(f"tokenizer file {path} not found; train in this workdir first") from None
  except json.JSONDecodeError as e:
    raise UserError(
      f"tokenizer file {path} is not valid JSON ({e}); delete it to rebuild"
    ) from None

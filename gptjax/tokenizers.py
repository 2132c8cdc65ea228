"""Tokenizers behind one small interface: text <-> int32 ids, plus an end-of-text id.

Char (vocabulary built from the training text, saved in the workdir) and byte (256 byte
values + specials). BPE and SentencePiece join later by implementing the same four members
and registering in `from_dict`.
"""

import abc
import json
import os
import uuid

import numpy as np

from gptjax.errors import UserError

EOT = "<|endoftext|>"


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
      ch = e.args[0]
      raise UserError(
          f"character {ch!r} (U+{ord(ch):04X}) is not in the char vocabulary built from "
          "the training text; remove it or use --config.data.tokenizer=byte") from None

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

  def to_dict(self):
    return {"kind": self.kind}


def from_dict(d: dict) -> Tokenizer:
  if d.get("kind") == "char":
    return CharTokenizer(d["chars"])
  if d.get("kind") == "byte":
    return ByteTokenizer()
  raise UserError(f"unknown tokenizer kind {d.get('kind')!r}; expected char or byte")


def save(tokenizer: Tokenizer, path: str) -> None:
  tmp = f"{path}.{uuid.uuid4().hex}.tmp"  # processes sharing a workdir never collide
  with open(tmp, "w") as f:
    json.dump(tokenizer.to_dict(), f)
  os.replace(tmp, path)  # atomic: a crash never leaves half a vocabulary


def load(path: str) -> Tokenizer:
  try:
    with open(path) as f:
      return from_dict(json.load(f))
  except FileNotFoundError:
    raise UserError(f"tokenizer file {path} not found; train in this workdir first") from None
  except json.JSONDecodeError as e:
    raise UserError(f"tokenizer file {path} is not valid JSON ({e}); delete it to rebuild")\
        from None

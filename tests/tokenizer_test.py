import json
import os

import numpy as np
import pytest
from conftest import ONE_DEVICE, SHAKESPEARE_DIR, run_cli

from gptjax import tokenizer as tokenizer_lib
from gptjax.errors import UserError

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n"


def test_char_round_trip_and_eot():
  tok = tokenizer_lib.CharTokenizer.train([TEXT])
  ids = tok.encode(TEXT)
  assert ids.dtype == np.int32 and len(ids) == len(TEXT)
  assert tok.decode(ids) == TEXT
  assert tok.vocab_size == len(set(TEXT)) + 1
  assert tok.decode([tok.eot_id]) == tokenizer_lib.EOT


def test_char_rejects_unknown_characters_by_name():
  tok = tokenizer_lib.CharTokenizer.train([TEXT])
  with pytest.raises(UserError, match=r"'Z' \(U\+005A\)"):
    tok.encode("Zebra")


@pytest.mark.parametrize("text", [TEXT, "héllo wörld ✓ 日本語 🙂", ""])
def test_byte_round_trip(text):
  tok = tokenizer_lib.ByteTokenizer()
  ids = tok.encode(text)
  assert len(ids) == len(text.encode("utf-8")) and (ids < 256).all()
  assert tok.decode(ids) == text
  assert tok.decode(np.append(ids, tok.eot_id)) == text + tokenizer_lib.EOT
  assert _joined_bytes(tok, np.append(ids, tok.eot_id)) == (text + tokenizer_lib.EOT).encode()


def _joined_bytes(tok, ids) -> bytes:
  """Every token's raw bytes, joined (as a client joins OpenAI logprobs' `bytes`): the text's
  UTF-8 even where a character is split across tokens."""
  return b"".join(tok.token_bytes(int(i)) for i in ids)


@pytest.mark.parametrize(
  "tok", [tokenizer_lib.CharTokenizer.train([TEXT]), tokenizer_lib.ByteTokenizer()]
)
def test_save_and_load(tmp_path, tok):
  path = str(tmp_path / "tokenizer.json")
  tokenizer_lib.save(tok, path)
  again = tokenizer_lib.load(path)
  assert again.kind == tok.kind and again.vocab_size == tok.vocab_size
  np.testing.assert_array_equal(again.encode(TEXT), tok.encode(TEXT))


def test_load_errors(tmp_path):
  with pytest.raises(UserError, match="not found"):
    tokenizer_lib.load(str(tmp_path / "missing.json"))
  (tmp_path / "bad.json").write_text("{not json")
  with pytest.raises(UserError, match="not valid JSON"):
    tokenizer_lib.load(str(tmp_path / "bad.json"))


# --- BPE and SentencePiece, trained here on Shakespeare (no downloads) ---

UNICODE = [
  "héllo wörld ✓ 日本語 🙂",
  "  two  spaces\n\nand\ttabs ",
  "ROMEO:\nBut, soft!",
  "a<|endoftext|>b",
  "",
]


@pytest.fixture(scope="module")
def shakespeare():
  with open(os.path.join(SHAKESPEARE_DIR, "input.txt"), encoding="utf-8") as f:
    return f.read()[:200_000]


@pytest.fixture(scope="module")
def bpe_dir(shakespeare, tmp_path_factory):
  """GPT-2-style files: tokenizer.json in one directory, vocab.json + merges.txt in another."""
  import tokenizers as hf

  tok = tokenizer_lib.BPETokenizer.train([shakespeare], 600)
  root = tmp_path_factory.mktemp("bpe")
  (root / "json").mkdir()
  (root / "json" / "tokenizer.json").write_text(tok.hf_json)
  (root / "files").mkdir()
  hf.Tokenizer.from_str(tok.hf_json).model.save(str(root / "files"))
  return root


@pytest.mark.parametrize("text", UNICODE)
def test_bpe_round_trip_from_tokenizer_json_and_from_vocab_merges(bpe_dir, text):
  a = tokenizer_lib.BPETokenizer.from_path(str(bpe_dir / "json"))
  b = tokenizer_lib.BPETokenizer.from_path(str(bpe_dir / "files"))
  ids = a.encode(text)
  assert ids.dtype == np.int32 and a.decode(ids) == text
  np.testing.assert_array_equal(b.encode(text), ids)
  assert a.vocab_size == b.vocab_size == 600 and a.eot_id == b.eot_id
  if "<|endoftext|>" in text:  # GPT-2: the literal string is the end-of-text id
    assert (ids == a.eot_id).sum() == 1
  assert _joined_bytes(a, ids) == text.encode()
  assert a.token_bytes(a.vocab_size + 5) == b""  # a model's padded vocabulary past the tokenizer's
  if any(ord(c) > 127 for c in text):  # some token holds part of a character
    assert any("\ufffd" in a.decode([i]) for i in ids)


def _bytes_to_unicode():
  """GPT-2's printable stand-ins for the 256 byte values (as byte-level BPE vocabularies use)."""
  keep = [
    *range(ord("!"), ord("~") + 1),
    *range(ord("¡"), ord("¬") + 1),
    *range(ord("®"), ord("ÿ") + 1),
  ]
  extra = [b for b in range(256) if b not in keep]
  return {b: chr(b) for b in keep} | {b: chr(256 + i) for i, b in enumerate(extra)}


def test_tiktoken_path_gives_the_same_ids(bpe_dir, monkeypatch):
  """tiktoken's gpt2 files cannot be downloaded here: give tiktoken the same vocabulary."""
  import tiktoken

  vocab = json.loads((bpe_dir / "files" / "vocab.json").read_text())
  decoder = {c: b for b, c in _bytes_to_unicode().items()}
  ranks = {bytes(decoder[c] for c in token): i for token, i in vocab.items()}
  eot = ranks.pop(b"<|endoftext|>")
  enc = tiktoken.Encoding(
    "test",
    pat_str=r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
    mergeable_ranks=ranks,
    special_tokens={"<|endoftext|>": eot},
  )
  monkeypatch.setattr(tiktoken, "get_encoding", lambda name: enc)
  tt = tokenizer_lib.BPETokenizer(tiktoken_name="gpt2")
  hf = tokenizer_lib.BPETokenizer.from_path(str(bpe_dir / "json"))
  assert tt.eot_id == hf.eot_id and tt.vocab_size == hf.vocab_size
  for text in UNICODE:
    np.testing.assert_array_equal(tt.encode(text), hf.encode(text))
    assert tt.decode(tt.encode(text)) == text
    assert _joined_bytes(tt, tt.encode(text)) == text.encode()
  assert tokenizer_lib.from_dict(tt.to_dict()).to_dict() == {"kind": "bpe", "tiktoken": "gpt2"}


@pytest.mark.parametrize("text", UNICODE)
def test_sentencepiece_train_and_round_trip(shakespeare, text):
  tok = tokenizer_lib.SentencePieceTokenizer.train([shakespeare], 500)
  ids = tok.encode(text)
  assert tok.vocab_size == 500 and tok.decode(ids) == text  # lossless, bytes as fallback
  assert _joined_bytes(tok, ids) in (text.encode(), b" " + text.encode())  # its word-start mark
  assert tok.decode([tok.eot_id]) == tokenizer_lib.EOT
  again = tokenizer_lib.from_dict(json.loads(json.dumps(tok.to_dict())))
  np.testing.assert_array_equal(again.encode(text), ids)


def test_missing_tokenizer_files_are_named(tmp_path):
  with pytest.raises(UserError, match="no BPE tokenizer files at .*vocab.json \\+ merges.txt"):
    tokenizer_lib.BPETokenizer.from_path(str(tmp_path))
  with pytest.raises(UserError, match="SentencePiece model .*nope.model' not found"):
    tokenizer_lib.SentencePieceTokenizer.from_file(str(tmp_path / "nope.model"))
  with pytest.raises(UserError, match="needs --config.data.tokenizer_path"):
    tokenizer_lib.build("sentencepiece", None, lambda: [])
  (tmp_path / "junk.model").write_bytes(b"not a model")
  with pytest.raises(UserError, match="is not a SentencePiece model"):
    tokenizer_lib.SentencePieceTokenizer.from_file(str(tmp_path / "junk.model"))


@pytest.mark.slow
def test_train_a_sentencepiece_model_and_use_it_in_an_experiment(tmp_path):
  """The CLI trains a model; a run tokenizes with it and keeps it in its workdir."""
  import subprocess
  import sys

  from conftest import REPO

  model = tmp_path / "sp.model"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "gptjax.train_tokenizer",
      "--kind=sentencepiece",
      "--vocab_size=400",
      f"--input={SHAKESPEARE_DIR}/input.txt",
      f"--output={model}",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=240,
  )
  assert proc.returncode == 0 and model.exists(), proc.stderr[-2000:]
  workdir = tmp_path / "run"
  proc = run_cli(
    "--config=experiments/tiny.py",
    f"--workdir={workdir}",
    "--config.train.num_steps=4",
    "--config.data.tokenizer=sentencepiece",
    f"--config.data.tokenizer_path={model}",
    env=ONE_DEVICE,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads((workdir / "config.json").read_text())["model"]["vocab_size"] == 400
  saved = tokenizer_lib.load(str(workdir / "tokenizer.json"))
  assert saved.kind == "sentencepiece" and saved.decode(saved.encode("ROMEO:")) == "ROMEO:"
  # A missing model file is one line: test_missing_tokenizer_files_are_named, in-process.
  for flags, fragment in (
    ([f"--input={SHAKESPEARE_DIR}/input.txt", f"--output={tmp_path}"], "is a directory; name a file"),
    ([f"--input={tmp_path / 'empty.txt'}", f"--output={model}"], "the training text is empty"),
  ):  # fmt: skip
    (tmp_path / "empty.txt").write_text("\n")
    proc = subprocess.run(
      [sys.executable, "-m", "gptjax.train_tokenizer", "--kind=bpe", "--vocab_size=400", *flags],
      cwd=REPO, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and fragment in proc.stderr


def test_a_vocabulary_too_small_for_the_characters_names_the_numbers():
  texts = [open(f"{SHAKESPEARE_DIR}/input.txt").read()[:200_000]]
  with pytest.raises(UserError, match="a vocabulary of 300 is below the 3.. ids this text's"):
    tokenizer_lib.SentencePieceTokenizer.train(texts, 300)


@pytest.mark.slow
def test_the_old_program_name_still_works_and_says_it_is_deprecated():
  import subprocess
  import sys

  from conftest import REPO

  proc = subprocess.run(
    [sys.executable, "-m", "gptjax.tokenize", "train", "--kind=bpe"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 1 and len(lines) == 2, proc.stderr
  assert "deprecated; use python -m gptjax.train_tokenizer" in lines[0]
  assert lines[1] == "gptjax.train_tokenizer: error: --output=PATH is required"

import numpy as np
import pytest

from gptjax import tokenizers
from gptjax.errors import UserError

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n"


def test_char_round_trip_and_eot():
  tok = tokenizers.CharTokenizer.train([TEXT])
  ids = tok.encode(TEXT)
  assert ids.dtype == np.int32 and len(ids) == len(TEXT)
  assert tok.decode(ids) == TEXT
  assert tok.vocab_size == len(set(TEXT)) + 1
  assert tok.decode([tok.eot_id]) == tokenizers.EOT


def test_char_rejects_unknown_characters_by_name():
  tok = tokenizers.CharTokenizer.train([TEXT])
  with pytest.raises(UserError, match=r"'Z' \(U\+005A\)"):
    tok.encode("Zebra")


@pytest.mark.parametrize("text", [TEXT, "héllo wörld ✓ 日本語 🙂", ""])
def test_byte_round_trip(text):
  tok = tokenizers.ByteTokenizer()
  ids = tok.encode(text)
  assert len(ids) == len(text.encode("utf-8")) and (ids < 256).all()
  assert tok.decode(ids) == text
  assert tok.decode(np.append(ids, tok.eot_id)) == text + tokenizers.EOT


@pytest.mark.parametrize("tok", [tokenizers.CharTokenizer.train([TEXT]),
                                 tokenizers.ByteTokenizer()])
def test_save_and_load(tmp_path, tok):
  path = str(tmp_path / "tokenizer.json")
  tokenizers.save(tok, path)
  again = tokenizers.load(path)
  assert again.kind == tok.kind and again.vocab_size == tok.vocab_size
  np.testing.assert_array_equal(again.encode(TEXT), tok.encode(TEXT))


def test_load_errors(tmp_path):
  with pytest.raises(UserError, match="not found"):
    tokenizers.load(str(tmp_path / "missing.json"))
  (tmp_path / "bad.json").write_text("{not json")
  with pytest.raises(UserError, match="not valid JSON"):
    tokenizers.load(str(tmp_path / "bad.json"))

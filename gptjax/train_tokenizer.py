"""Train a tokenizer: `python -m gptjax.train_tokenizer --kind=sentencepiece|bpe ...`.

    python -m gptjax.train_tokenizer --kind=sentencepiece --vocab_size=8000 \
        --input='corpus/*.txt' --output=tok/sp8k.model
    python -m gptjax.train_tokenizer --kind=bpe --vocab_size=16000 \
        --config=experiments/shakespeare_char.py --output=tok/bpe16k.json

The text is --input (a file or glob) or the training split of an experiment's data
(--config). Then train with --config.data.tokenizer=sentencepiece|bpe
--config.data.tokenizer_path=OUTPUT.
"""

import os

from absl import flags
from ml_collections import config_flags

from gptjax import cli, data, storage
from gptjax import config as config_lib
from gptjax import tokenizer as tokenizer_lib
from gptjax.errors import UserError
from gptjax.storage import ensure_writable_dir

_KIND = flags.DEFINE_enum("kind", "sentencepiece", ["sentencepiece", "bpe"], "What to train.")
_VOCAB = flags.DEFINE_integer("vocab_size", 8000, "Vocabulary size, specials included.")
_MODEL_TYPE = flags.DEFINE_enum(
  "model_type", "bpe", ["bpe", "unigram"], "sentencepiece: the segmentation algorithm."
)
_INPUT = flags.DEFINE_string("input", None, "Text file or glob to train on.")
_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Or: an experiment whose training split to train on.", lock_config=True
)
_OUTPUT = flags.DEFINE_string(
  "output", None, "Where to write (.model for sentencepiece, a tokenizer.json for bpe)."
)


def _texts():
  if bool(_INPUT.value) == bool(_CONFIG.value):
    raise UserError("pass one of --input=FILE_OR_GLOB or --config=experiments/NAME.py")
  if _INPUT.value:
    return data.read_text_files(_INPUT.value, "--input")
  config_lib.validate(_CONFIG.value)
  return data.train_texts(_CONFIG.value)


def main(argv) -> None:
  if len(argv) > 1:
    raise UserError(
      f"unexpected arguments {argv[1:]}; usage: python -m gptjax.train_tokenizer --kind=... "
      "--vocab_size=N (--input=FILES | --config=EXPERIMENT) --output=PATH"
    )
  if not _OUTPUT.value:
    raise UserError("--output=PATH is required")
  if _VOCAB.value < 260:
    raise UserError(
      f"--vocab_size={_VOCAB.value} is too small: the 256 byte values and the specials alone "
      "need 260"
    )
  if storage.isdir(_OUTPUT.value):
    raise UserError(f"--output={_OUTPUT.value} is a directory; name a file in it")
  ensure_writable_dir(os.path.dirname(storage.absolute(_OUTPUT.value)), "--output")
  texts = _texts()
  if not any(t.strip() for t in texts):
    raise UserError("the training text is empty; point --input (or the experiment) at text")
  if _KIND.value == "sentencepiece":
    tok = tokenizer_lib.SentencePieceTokenizer.train(texts, _VOCAB.value, _MODEL_TYPE.value)
    with storage.open(_OUTPUT.value, "wb") as f:
      f.write(tok.model_proto)
  else:
    tok = tokenizer_lib.BPETokenizer.train(texts, _VOCAB.value)
    with storage.open(_OUTPUT.value, "w", encoding="utf-8") as f:
      f.write(tok.hf_json)
  print(
    f"wrote a {_KIND.value} tokenizer of {tok.vocab_size} ids (<|endoftext|> = "
    f"{tok.eot_id}) to {_OUTPUT.value}; train with --config.data.tokenizer="
    f"{_KIND.value} --config.data.tokenizer_path={_OUTPUT.value}"
  )


if __name__ == "__main__":
  cli.run(main, "gptjax.train_tokenizer")

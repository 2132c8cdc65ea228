"""The old spelling of `python -m gptjax.train_tokenizer` (`python -m gptjax.tokenize train
...`): says so in one line, then runs it."""

import runpy
import sys

if __name__ == "__main__":
  print(
    "gptjax.tokenize: warning: deprecated; use python -m gptjax.train_tokenizer (no 'train')",
    file=sys.stderr,
    flush=True,
  )
  if sys.argv[1:2] == ["train"]:
    del sys.argv[1]
  runpy.run_module("gptjax.train_tokenizer", run_name="__main__", alter_sys=True)

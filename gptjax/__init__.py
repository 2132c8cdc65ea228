"""gptjax: GPT-style language models in JAX/Flax, sharded, resumable, launched by flag."""

__version__ = "0.1.0"

import os
import signal
import sys

# gs:// goes through gcsfs, never tf.io.gfile, whether or not TensorFlow is installed (etils
# reads this once, at its first gs:// path): gptjax/storage.py says why.
os.environ.setdefault("EPATH_USE_TF", "false")


def _program() -> str | None:
  """ "gptjax" or "gptjax.bench" (as cli.run names it) when run as `python -m gptjax.X`."""
  argv = getattr(sys, "orig_argv", [])
  at = argv.index("-m") + 1 if "-m" in argv else len(argv)
  module = argv[at] if at < len(argv) else ""
  if module.startswith("gptjax."):
    return "gptjax" if module == "gptjax.main" else module
  return None


def _interrupted_while_starting(signum, frame) -> None:
  """Ctrl-C in the seconds a program spends importing JAX: one line, then the process ends
  as killed by SIGINT. (A KeyboardInterrupt there would print a traceback, or surface as a
  C extension's ImportError.) cli.run puts Python's own handler back once the program runs."""
  print(f"{_program()}: interrupted while starting", file=sys.stderr, flush=True)
  signal.signal(signum, signal.SIG_DFL)
  os.kill(os.getpid(), signum)


# A program of ours, never a library user's process; an ignored SIGINT (`cmd &` in a script)
# stays ignored.
if _program() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
  signal.signal(signal.SIGINT, _interrupted_while_starting)

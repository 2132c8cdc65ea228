"""Entry point: `python -m gptjax.main --config=experiments/NAME.py[:ARG] --workdir=DIR`.

Parses flags and hands over to a library function; every UserError (here or in flag parsing)
becomes one line on stderr and exit code 1.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from gptjax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment file, e.g. experiments/shakespeare_char.py:cpu; override any "
    "key with --config.a.b=value.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where metrics, events, config and data go.")
_MODE = flags.DEFINE_enum("mode", "train", ["train"], "What to do.")


def _fail(message: str) -> None:
  print(f"gptjax: error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
  sys.exit(1)


def _parse_flags(argv):
  """absl's parser, but each bad flag or config override is a one-line error."""
  try:
    rest = flags.FLAGS(argv)
    if _CONFIG.value is None:
      raise UserError("--config is required, e.g. --config=experiments/shakespeare_char.py:cpu")
    if not _WORKDIR.value:
      raise UserError("--workdir is required, e.g. --workdir=/tmp/run")
    return rest
  except (flags.Error, UserError) as e:
    _fail(e)
  except Exception as e:  # an experiment file that fails to load, or a bad variant name
    _fail(f"cannot load the experiment config: {type(e).__name__}: {e}")


def main(argv) -> None:
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}; flags look like --name=value")
  from gptjax import train  # after flag parsing: a typo fails before JAX starts
  try:
    if _MODE.value == "train":
      train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except UserError as e:
    _fail(e)
  except KeyboardInterrupt:
    _fail("interrupted")


if __name__ == "__main__":
  flags.FLAGS.set_default("verbosity", logging.WARNING)  # INFO chatter only with --verbosity=0
  app.run(main, flags_parser=_parse_flags)

"""The one exception type for mistakes a user can make (flags, configs, files).

main turns a UserError into a one-line message and exit code 1; anything else is a bug
and keeps its traceback.
"""

import os
import sys
import uuid


class UserError(Exception):
  """A bad input: the message names the bad value and how to fix it."""


def ensure_writable_dir(path: str, flag: str) -> None:
  """Creates `path` if needed and proves it writable, or names `flag` as the fix."""
  try:
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, f".write_test.{uuid.uuid4().hex}")  # hosts may share it
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise UserError(f"cannot write to {path!r} ({e.strerror}); pass a writable {flag}") \
        from None


def check_config_file(argv) -> None:
  """A --config=PATH[:ARG] whose file does not exist is a UserError (before absl loads it)."""
  for arg in argv:
    if arg.startswith("--config="):
      path = arg[len("--config="):].split(":")[0]
      if not os.path.isfile(path):
        raise UserError(f"experiment file {path!r} not found; pass "
                        "--config=experiments/NAME.py (relative to the current directory)")


def innermost_message(e: BaseException) -> str:
  """ml_collections nests a KeyError inside an AttributeError; its text is the key's name."""
  while e.args and isinstance(e.args[0], BaseException):
    e = e.args[0]
  return str(e.args[0]) if e.args else str(e)


def flags_parser(program: str):
  """An absl flags parser for the side programs (sweep, tokenize, bench): a bad flag, a
  missing experiment file or one that fails to load is one line and exit 1."""
  from absl import flags

  def parse(argv):
    try:
      check_config_file(argv)
      rest = flags.FLAGS(argv)
      if "config" in flags.FLAGS and flags.FLAGS["config"].value is not None:
        flags.FLAGS["config"].value.keys()  # loads lazily: make its errors surface here
      return rest
    except Exception as e:  # flags.Error, UserError, or the experiment file's own error
      message = " ".join(str(e).split()) or type(e).__name__
      if isinstance(e, (AttributeError, KeyError)):  # ml_collections' unknown --config.KEY
        message = ("unknown config key " + " ".join(innermost_message(e).split())
                   + "; the keys and their defaults are in gptjax/config.py")
      print(f"{program}: error: {message}", file=sys.stderr, flush=True)
      sys.exit(1)
  return parse

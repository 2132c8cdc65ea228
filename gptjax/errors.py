"""The one exception type for mistakes a user can make (flags, configs, files).

main turns a UserError into a one-line message and exit code 1; anything else is a bug
and keeps its traceback.
"""

import ast
import os
import re
import sys
import uuid


class UserError(Exception):
  """A bad input: the message names the bad value and how to fix it."""


def ensure_writable_dir(path: str, flag: str) -> None:
  """Creates `path` if needed and proves it writable, or names `flag` as the fix."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(
      f"{flag}={path} is a file, not a directory; pass a directory (it is created if missing)"
    )
  try:
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, f".write_test.{uuid.uuid4().hex}")  # hosts may share it
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise UserError(f"cannot write to {path!r} ({e.strerror}); pass a writable {flag}") from None


def check_config_file(argv) -> None:
  """A --config=PATH[:ARG] whose file does not exist is a UserError (before absl loads it)."""
  for arg in argv:
    if arg.startswith("--config="):
      path = arg[len("--config=") :].split(":")[0]
      if not os.path.isfile(path):
        raise UserError(
          f"experiment file {path!r} not found; pass "
          "--config=experiments/NAME.py (relative to the current directory)"
        )
      _check_defines_get_config(path)


def _check_defines_get_config(path: str) -> None:
  """ml_collections reports a file without get_config() as a missing attribute, which reads
  like an unknown config key: look before it loads the file."""
  try:
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read(), path)
  except SyntaxError as e:
    raise UserError(
      f"experiment file {path} has a syntax error at line {e.lineno}: {e.msg}"
    ) from None
  names = {
    node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
  }
  names |= {
    t.id
    for node in tree.body
    if isinstance(node, ast.Assign)
    for t in node.targets
    if isinstance(t, ast.Name)
  }
  names |= {
    (a.asname or a.name)
    for node in tree.body
    if isinstance(node, ast.ImportFrom)
    for a in node.names
  }
  if "get_config" not in names:
    raise UserError(
      f"experiment file {path} defines no get_config(); an experiment file "
      "returns its ConfigDict from get_config() (see experiments/tiny.py)"
    )


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
      from gptjax import workdir

      workdir.normalize_flags(flags.FLAGS)
      return rest
    except Exception as e:  # flags.Error, UserError, or the experiment file's own error
      message = " ".join(str(e).split()) or type(e).__name__
      if isinstance(e, (AttributeError, KeyError)):  # ml_collections' unknown --config.KEY
        message = (
          "unknown config key "
          + " ".join(innermost_message(e).split())
          + "; the keys and their defaults are in gptjax/config.py"
        )
      print(f"{program}: error: {message}", file=sys.stderr, flush=True)
      sys.exit(1)

  return parse


def describe(e: BaseException) -> str:
  """An exception as a short readable reason: its first sentence of substance, without
  tensorstore's JSON specs or Python object reprs, cut at a word boundary."""
  text = " ".join(str(e).split())
  text = text.split(" [tensorstore_spec")[0]
  text = re.sub(r"<[^<>]*(object|method|function)[^<>]*>", "", text).strip(" :;,")
  if not text:
    return type(e).__name__
  if len(text) > 240:
    text = text[:240].rsplit(" ", 1)[0] + " ..."
  return text

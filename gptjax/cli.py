"""What every program (main, bench, sweep, report, train_tokenizer) shares: flags parsed so
that each bad flag, experiment file or config key is one line, and a UserError raised
anywhere below becomes `PROGRAM: error: ...` with exit code 1. Anything else is a bug and
keeps its traceback.

    if __name__ == "__main__":
      cli.run(main, "gptjax.bench")
"""

import ast
import errno
import os
import signal
import sys
from collections.abc import Callable

from absl import app, flags, logging

import gptjax
from gptjax import workdir
from gptjax.errors import OUT_OF_MEMORY_FIX, UserError


def fail(program: str, message) -> None:
  """One line on stderr, exit code 1."""
  print(f"{program}: error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
  sys.exit(1)


def run(main: Callable, program: str, check: Callable[[], None] | None = None) -> None:
  """absl's app.run(main) with one-line errors. check(), if given, runs after the flags are
  parsed (a program's own rules about which flags go together) and may raise UserError."""

  def guarded(argv):
    if signal.getsignal(signal.SIGINT) is gptjax._interrupted_while_starting:
      signal.signal(signal.SIGINT, signal.default_int_handler)  # started: KeyboardInterrupt
    try:
      main(argv)
    except UserError as e:
      fail(program, e)
    except OSError as e:  # a full disk under any write (metrics, config.json, exports)
      if e.errno != errno.ENOSPC:
        raise
      where = f" writing {e.filename}" if e.filename else ""
      fail(program, f"no space left on the device{where}; free some, or use another disk")
    except Exception as e:  # JAX's runtime error, named without importing JAX (report, sweep)
      if type(e).__name__ != "JaxRuntimeError" or "RESOURCE_EXHAUSTED" not in str(e):
        raise
      fail(program, f"out of device memory ({str(e).splitlines()[0][:160]}); {OUT_OF_MEMORY_FIX}")
    except KeyboardInterrupt:
      fail(program, "interrupted")

  app.run(guarded, flags_parser=flags_parser(program, check))


def flags_parser(program: str, check: Callable[[], None] | None = None):
  """An absl flags parser: a bad flag, a missing or broken experiment file, an unknown config
  key or a failed check() is one line and exit 1; path flags come out absolute."""

  def parse(argv):
    try:
      check_config_file(argv)
      rest = flags.FLAGS(argv)
      if not flags.FLAGS["verbosity"].present:  # INFO chatter only with --verbosity=0
        logging.set_verbosity(logging.WARNING)
      if "config" in flags.FLAGS and flags.FLAGS["config"].value is not None:
        flags.FLAGS["config"].value.keys()  # loads lazily: make its errors surface here
      if check is not None:
        check()
      workdir.normalize_flags(flags.FLAGS)
      return rest
    except (flags.Error, UserError) as e:
      if "Unknown command line flag 'config." in str(e) and "config" in flags.FLAGS:
        e = f"{e}: a --config.KEY=VALUE override needs --config=experiments/NAME.py to apply to"
      fail(program, e)
    except (AttributeError, KeyError) as e:  # ml_collections' word for an unknown key
      fail(program, _unknown_key(e, argv))
    except Exception as e:  # an experiment file that fails to load, or a bad variant name
      fail(program, f"cannot load the experiment config: {type(e).__name__}: {e}")

  return parse


def _unknown_key(e: BaseException, argv) -> str:
  """ml_collections nests a KeyError in an AttributeError whose text is the bare key name:
  name the whole dotted key the user typed."""
  while e.args and isinstance(e.args[0], BaseException):
    e = e.args[0]
  lines = (str(e.args[0]) if e.args else str(e)).splitlines()
  name = lines[0].strip("'\"")
  keys = [a.split("=")[0][len("--") :] for a in argv if a.startswith("--config.")]
  key = next((k for k in keys if name in k.split(".")), name)
  hint = f" ({lines[1].strip()})" if len(lines) > 1 else ""
  return f"unknown config key {key!r}{hint}; the keys and their defaults are in gptjax/config.py"


def check_config_file(argv) -> None:
  """A --config=PATH[:ARG] whose file does not exist, does not parse or defines no
  get_config() is a UserError, before ml_collections loads it (and reports a missing
  get_config as an unknown config key)."""
  for arg in argv:
    if not arg.startswith("--config="):
      continue
    path = arg[len("--config=") :].split(":")[0]
    if not os.path.isfile(path):
      raise UserError(
        f"experiment file {path!r} not found; pass "
        "--config=experiments/NAME.py (relative to the current directory)"
      )
    try:
      with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    except SyntaxError as e:
      raise UserError(
        f"experiment file {path} has a syntax error at line {e.lineno}: {e.msg}"
      ) from None
    if "get_config" not in _top_level_names(tree):
      raise UserError(
        f"experiment file {path} defines no get_config(); an experiment file "
        "returns its ConfigDict from get_config() (see experiments/tiny.py)"
      )
    _check_arguments(tree, path, arg[len("--config=") :].split(":", 1)[1:])  # as ml_collections


def _check_arguments(tree: ast.Module, path: str, given: list[str]) -> None:
  """--config=PATH:ARG passes ARG (colons and all) to get_config(): one it cannot take, or
  none where it needs one, is one line."""
  fn = next((n for n in tree.body if getattr(n, "name", None) == "get_config"), None)
  if not isinstance(fn, ast.FunctionDef) or fn.args.vararg:
    return
  most, least = len(fn.args.args), len(fn.args.args) - len(fn.args.defaults)
  if len(given) > most:
    raise UserError(f"{path}'s get_config() takes no argument; drop ':{given[0]}'")
  if len(given) < least:
    raise UserError(f"{path}'s get_config() needs an argument: --config={path}:ARG")


def _top_level_names(tree: ast.Module) -> set[str]:
  names = set()
  for node in tree.body:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      names.add(node.name)
    elif isinstance(node, ast.Assign):
      names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    elif isinstance(node, ast.ImportFrom):
      names |= {a.asname or a.name for a in node.names}
  return names

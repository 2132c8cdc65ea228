"""Run every variant of an experiment's sweep: `python -m gptjax.sweep --config=FILE --workdir=DIR`.

An experiment file declares its variants with `get_sweep()` (the same ARG as get_config),
returning {variant name: {dotted config key: value}}; `product({key: [values]})` builds the
cross product of axes. Each variant trains in DIR/<variant>/ through `python -m gptjax.main`
(a process of its own: one failing variant never stops the others), with its log in
DIR/<variant>/train.log. Finished variants (summary.json at num_steps) are skipped and
interrupted ones resume from their newest checkpoint, so rerunning a sweep finishes it.

  --variant=NAME       run only that variant
  --print_commands     print one launch command per variant instead (for a cluster or pod);
                       sweep.json is still written, so the report can read the runs
  --config.a.b=value   applies to every variant (a variant's own value wins)
"""

import importlib.util
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile

from absl import flags
from ml_collections import config_flags

from gptjax import cli, storage
from gptjax import config as config_lib
from gptjax.errors import UserError
from gptjax.storage import ensure_writable_dir

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=+,-]*$")


def product(axes: dict) -> dict:
  """{key: [values]} -> every combination, named like 'norm=rmsnorm,positions=rope'."""
  keys = list(axes)
  out = {}
  for values in itertools.product(*(axes[k] for k in keys)):
    name = ",".join(f"{k.split('.')[-1]}={v}" for k, v in zip(keys, values))
    out[name] = dict(zip(keys, values))
  return out


def load_sweep(spec: str) -> dict:
  """'experiments/X.py[:ARG]' -> its get_sweep(ARG), checked."""

  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_gptjax_sweep_experiment", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise UserError(
      f"{path} declares no sweep; add get_sweep() returning "
      "{variant name: {config key: value}} (see gptjax/sweep.py)"
    )
  variants = module.get_sweep(arg) if arg else module.get_sweep()
  if not variants:
    raise UserError(f"{path}'s get_sweep() returned no variants")
  for name in variants:
    if not _NAME.match(name):
      raise UserError(
        f"variant name {name!r} is not a safe directory name; use letters, digits and _ . = + , -"
      )
  return variants


def _value(v) -> str:
  return str(v).lower() if isinstance(v, bool) else str(v)


def variant_config(base, name: str, overrides: dict):
  """The base config with a variant's overrides; UserError naming the variant and the key."""
  config = base.copy_and_resolve_references()
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    try:
      for p in parents:
        node = node[p]
      if leaf not in node:
        raise KeyError(leaf)
      with node.unlocked():
        node[leaf] = value
    except (KeyError, AttributeError):
      raise UserError(f"variant {name!r}: unknown config key {key!r}") from None
    except (TypeError, ValueError) as e:
      raise UserError(f"variant {name!r}: {key}={value!r}: {e}") from None
  try:
    config_lib.validate(config)
  except UserError as e:
    raise UserError(f"variant {name!r}: {e}") from None
  return config


def command(spec: str, workdir: str, common: list[str], overrides: dict) -> list[str]:
  return [
    sys.executable,
    "-m",
    "gptjax.main",
    f"--config={spec}",
    f"--workdir={workdir}",
    *common,
    *(f"--config.{k}={_value(v)}" for k, v in overrides.items()),
  ]


def finished(workdir: str, num_steps: int) -> bool:
  path = storage.join(workdir, "summary.json")
  if not storage.exists(path):
    return False
  summary = storage.read_json(path)
  return summary.get("steps", 0) >= num_steps and not summary.get("preempted_at")


def run(
  spec: str,
  base,
  root: str,
  common: list[str],
  only: str | None = None,
  print_commands: bool = False,
  say=print,
) -> dict:
  """Runs (or prints) every variant; returns {variant: 'finished'|'skipped'|'failed: ...'}."""
  variants = load_sweep(spec)
  if only is not None:
    if only not in variants:
      raise UserError(f"no variant {only!r} in {spec}; it has {', '.join(variants)}")
    variants = {only: variants[only]}
  ensure_writable_dir(root, "--workdir")
  record = storage.join(root, "sweep.json")
  previous = storage.read_json(record) if storage.exists(record) else {}
  _check_same_sweep(previous, spec, common, record)
  with storage.open(record, "w") as f:  # what report.py reads: the overrides of every variant
    json.dump(
      {"config": spec, "common": common, "variants": {**previous.get("variants", {}), **variants}},
      f,
      indent=2,
    )
  status = {}
  for name, overrides in variants.items():
    workdir = storage.join(root, name)
    cmd = command(spec, workdir, common, overrides)
    if print_commands:
      print(shlex.join(["python", *cmd[1:]]))
      continue
    try:
      config = variant_config(base, name, overrides)
    except UserError as e:
      status[name] = f"failed: {e}"
      say(f"[{name}] error: {e}")
      _record_failure(workdir, status[name])
      continue
    if finished(workdir, config.train.num_steps):
      status[name] = "skipped"
      say(f"[{name}] already finished; skipped")
      continue
    storage.makedirs(workdir)
    say(f"[{name}] training in {workdir} (log: {workdir}/train.log)")
    rc = _train(cmd, storage.join(workdir, "train.log"), f"[{name}] ", say)
    failure = storage.join(workdir, FAILED)
    if rc == 0 and finished(workdir, config.train.num_steps):
      status[name] = "finished"
      say(f"[{name}] finished")
      if storage.exists(failure):
        storage.remove(failure)  # an earlier attempt's
    else:
      status[name] = f"failed: {_cause(storage.join(workdir, 'train.log'), rc)}"
      say(f"[{name}] {status[name]} (log: {workdir}/train.log)")
      _record_failure(workdir, status[name])
  return status


def _record_failure(workdir: str, why: str) -> None:
  """DIR/<variant>/FAILED says why, for gptjax.report (until an attempt finishes)."""
  storage.makedirs(workdir)
  storage.write_text(storage.join(workdir, FAILED), why + "\n")


def _train(cmd: list[str], log_path: str, prefix: str, say) -> int:
  """Runs one variant, its output appended to log_path; its step and eval lines also go to
  say(), after prefix (the sweep's console shows progress inside each variant)."""
  remote = storage.is_url(log_path)  # a bucket has no append: the log is uploaded whole
  local = log_path
  if remote:
    fd, local = tempfile.mkstemp(prefix="gptjax-sweep-", suffix=".log")
    os.close(fd)
  if remote and storage.exists(log_path):
    storage.download(log_path, local)  # earlier attempts' lines
  signals = []
  with open(local, "a") as log:
    # Its own session: a signal to the sweep (or its group) reaches it once, forwarded, so it
    # saves and stops (a second signal would stop it unsaved), logging to the end.
    proc = subprocess.Popen(
      cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
      start_new_session=True,
    )  # fmt: skip
    forward = lambda signum, _: (
      signals.append(signal.Signals(signum).name),
      proc.send_signal(signum),
    )
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
      for line in proc.stdout:
        log.write(line)
        log.flush()
        if line.startswith(("step ", "eval step ", "done: ", "SIGTERM ", "SIGINT ")):
          say(prefix + line.rstrip())
    finally:
      for sig, handler in previous.items():
        signal.signal(sig, handler)
  if remote:
    storage.upload(local, log_path)
    os.remove(local)
  rc = proc.wait()
  if signals:
    raise UserError(
      f"stopped by {signals[0]}, passed on to {prefix.strip()} (exit code {rc}; it says above "
      "whether it saved); rerun the same command to resume the sweep"
    )
  return rc


# Overrides that change where things are found, not what is trained: they may differ on a rerun.
_HARMLESS = ("compilation_cache_dir", "data.manual_dir", "data.data_dir", "data.cache_dir")


def _spec_key(spec: str) -> tuple[str, str]:
  path, _, arg = spec.partition(":")
  return os.path.realpath(path), arg


def _check_same_sweep(previous: dict, spec: str, common: list[str], record: str) -> None:
  """A rerun in a sweep's directory must be that sweep: the same experiment and the same
  --config.* overrides. Otherwise a finished variant would silently resume with other
  settings (e.g. extended to another num_steps); UserError naming the difference."""
  if not previous:
    return
  if "config" in previous and _spec_key(previous["config"]) != _spec_key(spec):
    raise UserError(
      f"{os.path.dirname(record)} holds the sweep of {previous['config']} (sweep.json), not "
      f"{spec}; use another --workdir"
    )
  if "common" not in previous:
    return

  def settings(args):
    pairs = (a[len("--config.") :].partition("=") for a in args)
    return {k: v for k, _, v in pairs if k not in _HARMLESS}

  then, now = settings(previous["common"]), settings(common)
  if then != now:
    keys = sorted(k for k in {*then, *now} if then.get(k) != now.get(k))
    was = " ".join(f"--config.{k}={then[k]}" if k in then else f"(no --config.{k})" for k in keys)
    raise UserError(
      f"{os.path.dirname(record)} was swept with {was} (sweep.json); rerun with the same "
      "--config.* flags as the first time, or use a new --workdir for other settings"
    )


FAILED = "sweep_failed.txt"  # DIR/<variant>/FAILED: why the variant's last attempt failed


def _cause(log_path: str, rc: int) -> str:
  """The failed run's one-line error, else the last line of its log (a traceback's
  exception), else its exit code."""
  with storage.open(log_path, "rb") as log:  # bytes: etils' open takes no errors=
    text = log.read().decode("utf-8", errors="replace")
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  errors = [line for line in lines if line.startswith("gptjax: error:")]
  if errors:
    return errors[-1]
  return f"{lines[-1][:300]} (exit code {rc})" if lines else f"exit code {rc}"


def _split_argv(argv):
  """The --config.a.b=value flags (absl applies them to the base config; every run gets
  them too)."""
  return [a for a in argv[1:] if a.startswith("--config.")]


def _define_flags() -> None:
  """Only when run as a program: experiment files import this module for product()."""
  config_flags.DEFINE_config_file(
    "config", None, "Experiment file with get_sweep().", lock_config=True
  )
  flags.DEFINE_string("workdir", None, "The sweep's directory (a subdirectory per variant).")
  flags.DEFINE_string("variant", None, "Run only this variant.")
  flags.DEFINE_bool(
    "print_commands", False, "Print the launch commands and write sweep.json; train nothing."
  )


def main(argv) -> None:
  f = flags.FLAGS
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}; flags look like --name=value")
  spec = next((a[len("--config=") :] for a in sys.argv if a.startswith("--config=")), None)
  if not spec or not f.workdir:
    raise UserError(
      "usage: python -m gptjax.sweep --config=experiments/X.py[:ARG] "
      "--workdir=DIR [--variant=NAME] [--print_commands]"
    )
  status = run(spec, f.config, f.workdir, _split_argv(sys.argv), f.variant, f.print_commands)
  if status:
    failed = [n for n, s in status.items() if s.startswith("failed")]
    print(
      f"sweep: {len(status) - len(failed)} of {len(status)} variants done"
      + (f"; failed: {', '.join(failed)}" if failed else "")
      + f". Compare them: python -m gptjax.report {f.workdir}"
    )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
  _define_flags()
  cli.run(main, "gptjax.sweep")

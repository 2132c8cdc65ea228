"""Shared test helpers: small configs, a generated corpus, and a CLI runner."""

import atexit
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import filelock
import pytest

# Eight simulated CPU devices for every test (and every CLI subprocess): meshes need them,
# and everything else runs on the same 8-device default mesh (data=8) to keep it honest.
# Set before anything imports JAX.
_DEVICES_FLAG = "--xla_force_host_platform_device_count=8"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _DEVICES_FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# CLI subprocesses compile the same tiny steps again and again: JAX's persistent cache (on by
# default in gptjax, ~/.cache/gptjax/jax) skips that, but only for compiles over 1 s unless
# told otherwise.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# That cache lives in a directory of this session's own (tiny_config() and run_cli() point
# runs at it), never the user's ~/.cache/gptjax: tests must neither fill nor depend on it.
COMPILATION_CACHE_DIR = tempfile.mkdtemp(prefix="gptjax-test-jax-cache-")
atexit.register(shutil.rmtree, COMPILATION_CACHE_DIR, ignore_errors=True)

import jax  # noqa: E402  (after the environment above)

# Implicit rank promotion (e.g. (T,) + (B, T) broadcasting by accident) is an error in tests,
# in-process; CLI subprocesses keep the library's default.
jax.config.update("jax_numpy_rank_promotion", "raise")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE_DIR = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "tinyshakespeare"))
DIALOGUE_DIR = os.path.join(os.path.dirname(SHAKESPEARE_DIR), "shakespeare_dialogue")


def tiny_config(**overrides):
  """The tiny experiment, with dotted-key overrides (e.g. model__norm='rmsnorm')."""
  sys.path.insert(0, os.path.join(REPO, "experiments"))
  try:
    import tiny
  finally:
    sys.path.pop(0)
  c = tiny.get_config()
  c.compilation_cache_dir = COMPILATION_CACHE_DIR
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split("__")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


@pytest.fixture
def corpus(tmp_path):
  """A small generated corpus with learnable structure (repeated counting phrases)."""
  words = ["one", "two", "three", "four", "five", "six", "seven", "eight"]
  lines = [" ".join(words[(i + j) % 8] for j in range(6)) + "." for i in range(400)]
  path = tmp_path / "corpus.txt"
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def with_test_cache(args) -> list:
  """CLI args with the session's compilation cache added when they load an experiment
  (--config=) and set none themselves (modes without --config have no such key to set)."""
  args = [str(a) for a in args]
  if any(a.startswith("--config=") for a in args) and not any(
    a.startswith("--config.compilation_cache_dir") for a in args
  ):
    args.append(f"--config.compilation_cache_dir={COMPILATION_CACHE_DIR}")
  return args


def run_cli(*args, timeout=240, env=None, stdin=""):
  """Runs `python -m gptjax.main ARGS` from the repo root; returns the CompletedProcess."""
  return subprocess.run(
    [sys.executable, "-m", "gptjax.main", *with_test_cache(args)],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=timeout,
    input=stdin,
    env={**os.environ, **(env or {})},
  )


def start_cli(*args, env=None) -> subprocess.Popen:
  """Starts `python -m gptjax.main ARGS` (to signal or kill while it runs); pipes text."""
  return subprocess.Popen(
    [sys.executable, "-m", "gptjax.main", *with_test_cache(args)],
    cwd=REPO,
    env={**os.environ, **(env or {})},
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def wait_for(proc, condition, timeout=120) -> None:
  """Polls condition() while proc runs; fails if proc ends first or time runs out."""
  deadline = time.time() + timeout
  while not condition():
    assert proc.poll() is None, "the run ended before it could be interrupted"
    assert time.time() < deadline, "timed out waiting for the run"
    time.sleep(0.005)


def finalized_steps(workdir) -> list[int]:
  """The steps of a workdir's finished checkpoints (orbax lists a save once it is whole)."""
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def cache_copies_in_loops(hlo: str, cache_shape) -> list[str]:
  """The copies and transposes of a whole cache (as stored, or with its last two dims
  swapped) inside any computation but the entry one of an optimized HLO text: what a
  decoding step must not do (each is a full read and write of the cache per step)."""
  dims = lambda s: ",".join(map(str, s))
  *lead, slots, head = cache_shape
  wanted = {dims(cache_shape), dims((*lead, head, slots))}
  inside, found = False, []
  for line in hlo.splitlines():
    if line and not line.startswith(" "):  # a computation's header
      inside = not line.startswith("ENTRY")
    m = re.search(r"= [a-z0-9]+\[([0-9,]+)\]\S* (copy|transpose)\(", line)
    if inside and m and m.group(1) in wanted:
      found.append(line.strip()[:120])
  return found


ONE_DEVICE = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}  # fast subprocesses


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory):
  """A workdir with the tiny model trained 30 steps on Shakespeare (for sample and chat),
  trained once for all of a session's xdist workers: tests read it (or copy it to write)."""
  shared = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):  # a worker's base is popen-gwN in the session's
    shared = shared.parent
  workdir = shared / "trained_tiny"
  with filelock.FileLock(str(shared / "trained_tiny.lock")):
    if not (workdir / "summary.json").exists():
      proc = run_cli(
        "--config=experiments/tiny.py",
        f"--workdir={workdir}",
        "--config.train.num_steps=30",
        env=ONE_DEVICE,
      )
      assert proc.returncode == 0, proc.stderr[-2000:]
  return workdir


def run_cli_on_tmpfs(
  mountpoint, size, *args, env=None, timeout=240, copy_to=None, program=("-m", "gptjax.main")
):
  """Runs the CLI with a `size` tmpfs (e.g. "1600k") mounted at `mountpoint`: a small disk
  that really fills. A private mount namespace (unshare) keeps it from the host and unmounts
  it when the command ends; copy_to gets a copy of what was left on it."""
  os.makedirs(mountpoint, exist_ok=True)
  keep = f'; cp -a "{mountpoint}/." "{copy_to}/"' if copy_to else ""
  script = (
    f'mount -t tmpfs -o size={size} tmpfs "{mountpoint}" || exit 99; '
    f'"{sys.executable}" "$@"; rc=$?{keep}; exit $rc'
  )
  proc = subprocess.run(
    ["unshare", "-rm", "sh", "-c", script, "sh", *program, *with_test_cache(args)],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=timeout,
    env={**os.environ, **(env or {})},
  )
  assert proc.returncode != 99, f"cannot mount a tmpfs: {proc.stderr}"
  return proc


def free_port() -> int:
  """A TCP port on 127.0.0.1 nobody listens on (for a coordinator)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def one_line_error(proc, *fragments) -> str:
  """The single `gptjax: error:` line of a failed CLI run (exit 1, no traceback), checked to
  hold every fragment."""
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = [l for l in proc.stderr.splitlines() if l.startswith("gptjax: error:")]
  assert len(lines) == 1, proc.stderr[-3000:]
  for fragment in fragments:
    assert fragment in lines[0], lines[0]
  return lines[0]


@pytest.fixture(scope="session")
def saved_safetensors(tmp_path_factory):
  """(model, directory): a random transformers GPT-2 of hf_test's shape, saved as
  model.safetensors, for hf_test's CLI tests and hf_faults_test."""
  from hf_test import _hf_model  # torch and transformers: only in a worker that runs them

  model = _hf_model()
  path = tmp_path_factory.mktemp("hf_cli")
  model.save_pretrained(path, safe_serialization=True)
  return model, path


@pytest.fixture(scope="session")
def gcs():
  """A fake-gcs-server for this test session (worker) with gs://test-bucket, and its
  environment set in this process too (gcsfs and tensorstore read it at first use)."""
  from gcs_emulator import Emulator

  server = Emulator()
  os.environ.update(server.env)
  yield server
  server.stop()

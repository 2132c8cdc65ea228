"""Ctrl-C on a training run: during a long step (that step finishes and is saved), during
the compile (at once, nothing to save), and on a run too long for the CPU."""

import json
import re
import signal
import time

import pytest
from conftest import ONE_DEVICE, run_cli, start_cli

TINY = "--config=experiments/tiny.py"


@pytest.mark.slow
def test_a_run_too_long_for_the_cpu_says_so_and_ctrl_c_stops_it_within_seconds(tmp_path):
  """The first progress line warns that a GPU-sized run will take hours on a CPU; Ctrl-C
  then saves the last step and exits 0 within seconds (the host stays at most two steps
  ahead of the device, so no queue of dispatched steps delays it)."""
  proc = start_cli(
    TINY,
    f"--workdir={tmp_path}/w",
    "--config.train.num_steps=10000000",
    "--config.train.log_every=2",
    *("--config.model.d_model=128", "--config.model.n_head=4", "--config.train.batch_size=32"),
    env=ONE_DEVICE,
  )
  seen = _read_until(proc, "warning: at this speed")
  assert "experiments/shakespeare_char.py:cpu" in seen[-1]
  out, err, waited = _interrupt(proc)
  assert proc.returncode == 0, err[-2000:]
  assert "SIGINT received: saved checkpoint" in out
  assert waited < 15, f"Ctrl-C took {waited:.1f}s"  # a checkpoint save included


def _read_until(proc, pattern: str, timeout=180) -> list[str]:
  """proc's stdout lines up to the first matching pattern (the process killed on failure)."""
  deadline, seen = time.time() + timeout, []
  while not any(re.match(pattern, l) for l in seen):
    if proc.poll() is not None or time.time() > deadline:
      proc.kill()
      pytest.fail("".join(seen)[-2000:] + proc.communicate()[1][-2000:])
    seen.append(proc.stdout.readline())
  return seen


def _interrupt(proc) -> tuple[str, str, float]:
  """Ctrl-C now -> (the rest of stdout, stderr, seconds until the process ended)."""
  sent = time.time()
  proc.send_signal(signal.SIGINT)
  try:
    out, err = proc.communicate(timeout=60)
  finally:
    proc.kill()
  return out, err, time.time() - sent


@pytest.mark.slow
def test_ctrl_c_during_a_long_step_waits_for_that_step_alone(tmp_path):
  """With ~2 s steps the host runs no step ahead, so Ctrl-C ends the run (the running
  step finished and saved) within 5 s of that step's end."""
  proc = start_cli(
    TINY,
    f"--workdir={tmp_path}/w",
    "--config.train.num_steps=1000",
    "--config.train.log_every=1",
    *("--config.model.d_model=512", "--config.model.n_head=8", "--config.model.n_layer=4"),
    *("--config.train.batch_size=20", "--config.model.block_size=128"),
    "--config.train.eval_every=1000",
    env=ONE_DEVICE,
  )
  _read_until(proc, r"step +2/")
  out, err, waited = _interrupt(proc)
  assert proc.returncode == 0, err[-2000:]
  assert "SIGINT received: saved checkpoint 3 " in out, out[-2000:]
  lines = (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()
  step_s = json.loads(lines[-1])["step_ms"] / 1000
  assert step_s > 1.5, "the step is not slow enough to test this"
  assert waited < step_s + 5, f"Ctrl-C took {waited:.1f}s with {step_s:.1f}s steps"


@pytest.mark.slow
def test_ctrl_c_during_the_compile_stops_at_once(tmp_path):
  """A 32-layer step compiles for ~25 s here; Ctrl-C in it ends the process (there is
  nothing trained to save) without waiting for the compiler, and leaves no lock behind."""
  proc = start_cli(
    TINY,
    f"--workdir={tmp_path}/w",
    "--config.model.n_layer=32",
    "--config.compilation_cache_dir=",  # a cached compile would be over before the signal
    env=ONE_DEVICE,
  )
  _read_until(proc, "compiling the train and eval steps")
  time.sleep(1)
  _, _, waited = _interrupt(proc)
  assert proc.returncode == -signal.SIGINT and waited < 5, (proc.returncode, waited)
  assert not (tmp_path / "w" / "checkpoints").exists()
  again = run_cli(TINY, f"--workdir={tmp_path}/w", "--config.train.num_steps=2", env=ONE_DEVICE)
  assert again.returncode == 0, again.stderr[-2000:]  # no stale lock, no half-written data

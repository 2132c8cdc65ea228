"""The workdir as a user types it: relative, with ~, a file, locked (an flock; a lease on a
bucket, against fake-gcs-server), shared by every process."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import types

import pytest
from absl import flags
from conftest import ONE_DEVICE, REPO, free_port, one_line_error, run_cli, with_test_cache
from gcs_emulator import BUCKET

from gptjax import storage
from gptjax import workdir as workdir_lib
from gptjax.errors import UserError
from gptjax.storage import ensure_writable_dir

TINY = "--config=experiments/tiny.py"


def _as_user(cwd, *args, env=None):
  """`python -m gptjax.main ARGS` typed in `cwd`, where experiments/ is the repo's (the
  README's relative paths, from a directory that is not the repo)."""
  if not os.path.exists(cwd / "experiments"):
    os.symlink(os.path.join(REPO, "experiments"), cwd / "experiments")
  return subprocess.run(
    [sys.executable, "-m", "gptjax.main", *with_test_cache(args)],
    cwd=cwd,
    capture_output=True,
    text=True,
    timeout=240,
    env={**os.environ, **ONE_DEVICE, **(env or {})},
  )


@pytest.mark.slow
def test_a_relative_workdir_checkpoints_and_resumes(tmp_path):
  args = [TINY, "--workdir=runs/x", "--config.checkpoint.every=3"]
  first = _as_user(tmp_path, *args, "--config.train.num_steps=6")
  assert first.returncode == 0, first.stderr[-3000:]
  assert sorted(os.listdir(tmp_path / "runs/x/checkpoints")) == ["3", "6"]
  again = _as_user(tmp_path, *args, "--config.train.num_steps=9")
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resumed from checkpoint 6" in again.stdout
  assert not os.path.exists(tmp_path / "runs/x/checkpoints_corrupt")
  assert sorted(os.listdir(tmp_path / "runs/x/checkpoints")) == ["3", "6", "9"]


@pytest.mark.slow
def test_a_tilde_workdir_is_the_home_directory(tmp_path):
  home = tmp_path / "home"
  proc = _as_user(
    tmp_path,
    TINY,
    "--workdir=~/x",
    "--mode=compile_only",
    "--config.model.vocab_size=64",
    env={"HOME": str(home)},
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert os.path.isdir(home / "x") and not os.path.exists(tmp_path / "~")


def test_a_workdir_that_is_a_file(tmp_path):
  """Right after the flags are parsed (cli.flags_parser -> workdir.normalize_flags)."""
  (tmp_path / "f").write_text("not a directory")
  flag_values = flags.FlagValues()
  flags.DEFINE_string("workdir", None, "", flag_values=flag_values)
  flag_values(["gptjax", f"--workdir={tmp_path}/f"])
  with pytest.raises(UserError) as e:
    workdir_lib.normalize_flags(flag_values)
  line = str(e.value)
  assert f"--workdir={tmp_path}/f is a file, not a directory" in line and "File exists" not in line


def test_a_workdir_that_cannot_be_created_is_named(tmp_path):
  (tmp_path / "a_file").write_text("")  # a directory cannot live under a file, even for root
  with pytest.raises(UserError, match=re.escape(f"cannot write to '{tmp_path}/a_file/run'")) as e:
    ensure_writable_dir(f"{tmp_path}/a_file/run", "--workdir")  # what training checks first
  assert str(e.value).endswith("pass a writable --workdir")


def _start(workdir, *extra):
  return subprocess.Popen(
    [
      sys.executable,
      "-m",
      "gptjax.main",
      *with_test_cache([TINY, f"--workdir={workdir}"]),
      "--config.train.num_steps=100000",
      *extra,
    ],
    cwd=REPO,
    env={**os.environ, **ONE_DEVICE},
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def _wait_for_line(proc, text, timeout=120):
  deadline = time.time() + timeout
  for line in proc.stdout:
    if text in line:
      return
    assert time.time() < deadline, f"no {text!r} from the run"
  raise AssertionError(f"the run ended before printing {text!r}: {proc.stderr.read()[-2000:]}")


@pytest.mark.slow
def test_a_second_run_on_a_workdir_is_refused_and_a_killed_run_leaves_no_lock(tmp_path):
  first = _start(tmp_path / "w")
  try:
    _wait_for_line(first, "| loss")
    line = one_line_error(run_cli(TINY, f"--workdir={tmp_path}/w", env=ONE_DEVICE))
    assert f"is in use by pid {first.pid} on host {socket.gethostname()}" in line
    first.send_signal(signal.SIGKILL)
    first.wait()
  finally:
    first.kill()
  lines = open(tmp_path / "w" / "metrics.jsonl").read().splitlines()
  assert lines == sorted(set(lines), key=lines.index)  # one writer: nothing interleaved
  again = run_cli(TINY, f"--workdir={tmp_path}/w", "--config.train.num_steps=5", env=ONE_DEVICE)
  assert again.returncode == 0, again.stderr[-3000:]


def _two_processes(workdirs, *extra, each=((), ())):
  port = free_port()
  return [
    subprocess.Popen(
      [
        sys.executable,
        "-m",
        "gptjax.main",
        *with_test_cache([TINY, f"--workdir={workdirs[i]}"]),
        f"--config.distributed.coordinator_address=127.0.0.1:{port}",
        "--config.distributed.num_processes=2",
        f"--config.distributed.process_id={i}",
        "--config.distributed.timeout_s=60",
        *extra,
        *each[i],
      ],
      cwd=REPO,
      env={**os.environ, **ONE_DEVICE},
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]


@pytest.mark.parametrize(
  "hosts, each, says",
  [  # separate local directories would hang at the first checkpoint's finalisation;
    (("host0", "host1"), ((), ()), "is not one shared directory: process(es) 1 cannot see"),
    # other flags: each trained with its own learning rate while the gradients were averaged
    (("w", "w"), (["--config.optim.lr=1e-2"], ["--config.optim.lr=1e-5"]),
     "config.optim.lr differs between the processes (process(es) 1 against"),
  ],
)  # fmt: skip
@pytest.mark.slow
def test_processes_that_cannot_train_together_are_refused_at_once(tmp_path, hosts, each, says):
  procs = _two_processes([tmp_path / h for h in hosts], each=each)
  try:
    results = [p.communicate(timeout=180) for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, (_, err) in zip(procs, results):
    line = one_line_error(types.SimpleNamespace(returncode=p.returncode, stderr=err))
    assert says in line
  assert not os.path.exists(tmp_path / hosts[0] / "checkpoints")


@pytest.mark.slow
def test_a_dead_peer_stops_the_survivor_in_one_line_naming_it(tmp_path):
  # Killed between steps, a failed all-reduce names it at once; killed inside a save's
  # barrier, gptjax's watch names it at half the heartbeat timeout (JAX alone: 100 s, then
  # an abort with a stack dump).
  procs = _two_processes(
    [tmp_path / "w"] * 2,
    "--config.train.num_steps=100000",
    "--config.checkpoint.every=5",
    "--config.train.eval_every=100000",
    "--config.distributed.heartbeat_timeout_s=20",
  )
  try:
    ckpts = tmp_path / "w" / "checkpoints"
    deadline = time.time() + 180
    while not (ckpts.is_dir() and any(n.isdigit() for n in os.listdir(ckpts))):
      for p in procs:
        assert time.time() < deadline and p.poll() is None, p.stderr.read()[-2000:]
      time.sleep(0.1)
    procs[1].kill()
    out, err = procs[0].communicate(timeout=60)
  finally:
    for p in procs:
      p.kill()
  line = one_line_error(types.SimpleNamespace(returncode=procs[0].returncode, stderr=err))
  assert "process 0: process 1 of this 2-process run stopped responding" in line
  assert "resumes from checkpoint" in line
  assert "Fatal Python error" not in err and "Check failure" not in err


def test_a_lease_refuses_a_second_run_and_a_dead_holders_is_taken_over(gcs, monkeypatch):
  """A bucket has no flock: the lock is an object naming its holder, renewed while it runs."""
  run = f"gs://{BUCKET}/leased"
  first = workdir_lib.Lock(run)
  with pytest.raises(UserError, match=f"gs://{BUCKET}/leased is in use by pid {os.getpid()}"):
    workdir_lib.Lock(run)
  first.release()
  assert not storage.exists(f"{run}/{workdir_lib.LOCK}")
  # A holder on this host whose process is gone (a SIGKILLed run): its lease is stale.
  dead = subprocess.run(
    [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
  )
  stale = {"holder": "pid x", "host": socket.gethostname(), "pid": int(dead.stdout)}
  storage.write_text(f"{run}/{workdir_lib.LOCK}", json.dumps({**stale, "renewed": time.time()}))
  workdir_lib.Lock(run).release()
  # Another host's lease holds until it has gone LEASE_S without renewal (a preempted VM).
  other = {"holder": "pid 1 on host tpu-1", "host": "tpu-1", "pid": 1}
  storage.write_text(f"{run}/{workdir_lib.LOCK}", json.dumps({**other, "renewed": time.time()}))
  with pytest.raises(UserError, match="in use by pid 1 on host tpu-1"):
    workdir_lib.Lock(run)
  storage.write_text(
    f"{run}/{workdir_lib.LOCK}", json.dumps({**other, "renewed": time.time() - 1e4})
  )
  workdir_lib.Lock(run).release()


def test_a_lease_is_a_compare_and_swap(gcs, monkeypatch):
  """Two runs taking the lock together: one wins. A run whose lease another run took over
  (it stalled past LEASE_S) stops at its next renewal, in one line, without saving."""
  run = f"gs://{BUCKET}/raced"
  first = workdir_lib.Lock(run)
  real = storage.read_versioned
  monkeypatch.setattr(storage, "read_versioned", lambda url: (None, 0))  # read before `first`
  with pytest.raises(UserError, match="a run that took its lock at the same moment"):
    workdir_lib.Lock(run)
  monkeypatch.setattr(storage, "read_versioned", real)
  first.release()

  code = (
    "import sys, time; from gptjax import workdir; workdir.LEASE_S = 0.4; "
    f"workdir.Lock({run!r}); print('locked', flush=True); time.sleep(30)"
  )
  proc = subprocess.Popen(
    [sys.executable, "-c", code], cwd=REPO, env={**os.environ, **gcs.env},
    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
  )  # fmt: skip
  assert proc.stdout.readline().strip() == "locked"
  other = {"holder": "pid 7 on host tpu-2", "host": "tpu-2", "pid": 7, "renewed": time.time()}
  storage.write_text(f"{run}/{workdir_lib.LOCK}", json.dumps(other))  # the takeover
  _, err = proc.communicate(timeout=30)
  assert proc.returncode == 1, err
  assert "was taken over by pid 7 on host tpu-2" in err and "Traceback" not in err, err

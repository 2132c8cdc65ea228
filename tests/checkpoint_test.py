"""Checkpoints: exact resume after SIGKILL and SIGTERM, other meshes, faults, NaN, export."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import ONE_DEVICE, REPO, run_cli, tiny_config
from gptjax import checkpoint, sharding, train
from gptjax.model import abstract_params

STEPS = 200
ARGS = ["--config=experiments/tiny.py", f"--config.train.num_steps={STEPS}",
        "--config.train.log_every=1", "--config.train.eval_every=50",
        "--config.checkpoint.every=25", "--config.model.dropout=0.1"]
EXACT = ("loss", "lr", "grad_norm", "val_loss", "val_bpb")  # timing fields differ, these not


def _metrics(workdir):
  lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return [{k: l[k] for k in ("step", *EXACT) if k in l} for l in lines]


def _finalized(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _start(workdir, *extra):
  return subprocess.Popen([sys.executable, "-m", "gptjax.main", *ARGS, f"--workdir={workdir}",
                           *extra], cwd=REPO, env={**os.environ, **ONE_DEVICE},
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(proc, condition, timeout=120):
  deadline = time.time() + timeout
  while not condition():
    assert proc.poll() is None, "the run ended before it could be interrupted"
    assert time.time() < deadline, "timed out waiting for the run"
    time.sleep(0.005)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  proc = run_cli(*ARGS, f"--workdir={workdir}", env=ONE_DEVICE)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return _metrics(workdir)


def test_sigkill_then_restart_gives_the_uninterrupted_metrics_bit_for_bit(tmp_path,
                                                                           uninterrupted):
  workdir = tmp_path / "w"
  proc = _start(workdir)
  try:
    _wait_for(proc, lambda: len(_finalized(workdir)) >= 2)
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.kill()
    proc.communicate()
  killed = _metrics(workdir)
  assert killed[-1]["step"] < STEPS  # it really was cut short
  rerun = run_cli(*ARGS, f"--workdir={workdir}", env=ONE_DEVICE)
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  assert "resumed from checkpoint" in rerun.stdout
  assert _metrics(workdir) == uninterrupted  # floats compared exactly


def test_sigterm_saves_the_current_step_and_the_resumed_run_matches(tmp_path, uninterrupted):
  workdir = tmp_path / "w"
  proc = _start(workdir)
  try:
    _wait_for(proc, lambda: len(_finalized(workdir)) >= 1)
    time.sleep(0.05)  # mid-interval, between two periodic checkpoints
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
  finally:
    proc.kill()
  assert proc.returncode == 0, err[-2000:]
  stopped = int(out.split("saved checkpoint ")[1].split()[0])
  assert "SIGTERM received" in out and stopped in _finalized(workdir)
  assert stopped < STEPS
  rerun = run_cli(*ARGS, f"--workdir={workdir}", env=ONE_DEVICE)
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  assert f"resumed from checkpoint {stopped}" in rerun.stdout
  assert _metrics(workdir) == uninterrupted


def test_corrupted_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, uninterrupted):
  workdir = tmp_path / "w"
  args = [a.replace(f"num_steps={STEPS}", "num_steps=30").replace("checkpoint.every=25", "checkpoint.every=10")
          for a in ARGS]
  assert run_cli(*args, f"--workdir={workdir}", env=ONE_DEVICE).returncode == 0
  assert _finalized(workdir) == [10, 20, 30]
  for root, _, files in os.walk(workdir / "checkpoints" / "30"):
    for name in files:  # truncate every file of the newest checkpoint to half its size
      path = os.path.join(root, name)
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
  original = _metrics(workdir)
  rerun = run_cli(*args, f"--workdir={workdir}", env=ONE_DEVICE)
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  assert "warning: checkpoint 30" in rerun.stdout and "cannot be restored" in rerun.stdout
  assert "resumed from checkpoint 20" in rerun.stdout
  assert (workdir / "checkpoints_corrupt" / "30").is_dir()  # set aside, not deleted
  assert _metrics(workdir) == original  # steps 21..30 again, identical


def test_nan_stops_the_run_and_leaves_only_finite_checkpoints(tmp_path):
  workdir = tmp_path / "w"
  proc = run_cli("--config=experiments/tiny.py", f"--workdir={workdir}",
                 "--config.optim.lr=1e6", "--config.optim.warmup_steps=0",
                 "--config.checkpoint.every=1", "--config.train.num_steps=50", env=ONE_DEVICE)
  assert proc.returncode == 1
  error = [l for l in proc.stderr.splitlines() if l.startswith("gptjax: error:")]
  assert len(error) == 1 and "loss became nan" in error[0] and "at step" in error[0], error
  bad_step = int(error[0].split("at step ")[1].split(";")[0])
  saved = _finalized(workdir)
  assert saved and max(saved) < bad_step
  config = checkpoint.workdir_config(str(workdir))
  target = abstract_params(config)
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  params, meta = checkpoint.Checkpoints(str(workdir)).restore_params(
      target, jax.tree.map(lambda _: one, target))
  assert meta["step"] == max(saved)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_checkpoint_from_fsdp8_restores_onto_one_device(tmp_path):
  c = tiny_config(model__n_head=8, train__batch_size=16)
  c.mesh.shape.update(dict(data=1, fsdp=8))
  s8 = train.setup(c, 60, sharding.make_mesh(c.mesh))
  state = s8.init(c.seed)
  batch = np.random.default_rng(0).integers(0, 60, s8.batch_shape).astype(np.int32)
  for _ in range(3):
    state, _ = s8.train_step(state, s8.batch(batch))
  assert state.params["h_0"]["mlp"]["up"]["kernel"].sharding.spec[0] == "fsdp"
  loss8 = float(s8.eval_step(state.params, s8.batch(batch)))
  ckpt = checkpoint.Checkpoints(str(tmp_path))
  ckpt.save(state, {"step": 3})
  ckpt.wait()

  c.mesh.shape.update(dict(data=1, fsdp=1))
  s1 = train.setup(c, 60, sharding.make_mesh(c.mesh, jax.devices()[:1]))
  restored, meta = checkpoint.Checkpoints(str(tmp_path)).restore(s1.abstract, s1.state_shardings)
  assert meta["step"] == 3 and int(restored.step) == 3
  assert restored.params["h_0"]["mlp"]["up"]["kernel"].sharding.device_set == {jax.devices()[0]}
  loss1 = float(s1.eval_step(restored.params, s1.batch(batch)))
  np.testing.assert_allclose(loss1, loss8, rtol=1e-6)
  # Adam's state came along too: one more step agrees on both meshes.
  _, m8 = s8.train_step(state, s8.batch(batch))
  _, m1 = s1.train_step(restored, s1.batch(batch))
  np.testing.assert_allclose(float(m1["loss"]), float(m8["loss"]), rtol=1e-6)


def test_shape_mismatch_names_the_parameter(tmp_path):
  workdir = tmp_path / "w"
  assert run_cli("--config=experiments/tiny.py", f"--workdir={workdir}",
                 "--config.train.num_steps=2", env=ONE_DEVICE).returncode == 0
  proc = run_cli("--config=experiments/tiny.py", f"--workdir={workdir}",
                 "--config.train.num_steps=4", "--config.model.d_model=64", env=ONE_DEVICE)
  assert proc.returncode == 1
  error = [l for l in proc.stderr.splitlines() if l.startswith("gptjax: error:")]
  assert len(error) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert "checkpoint 2" in error[0] and "parameter h_0/attn/key/bias has shape (2, 16)"\
      in error[0] and "the config makes (2, 32)" in error[0], error[0]
  proc = run_cli("--config=experiments/tiny.py", f"--workdir={workdir}",  # no clipping state
                 "--config.train.num_steps=4", "--config.optim.grad_clip=0", env=ONE_DEVICE)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert "optimizer state of another structure" in proc.stderr, proc.stderr[-2000:]
  proc = run_cli("--config=experiments/tiny.py", f"--workdir={workdir}",  # stacked layers
                 "--config.train.num_steps=4", "--config.model.scan_layers=true", env=ONE_DEVICE)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert "set --config.model.scan_layers=False as it was trained" in proc.stderr, \
      proc.stderr[-2000:]
  assert os.listdir(workdir / "checkpoints") == ["2"]  # nothing was set aside


def test_export_is_params_only_and_keep_best_keeps_the_lowest_val_loss(tmp_path):
  workdir = tmp_path / "w"
  proc = run_cli("--config=experiments/tiny.py", f"--workdir={workdir}",
                 "--config.train.num_steps=40", "--config.train.eval_every=10",
                 "--config.checkpoint.every=10", "--config.checkpoint.keep=2",
                 "--config.checkpoint.keep_best=true", env=ONE_DEVICE)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert _finalized(workdir) == [30, 40]
  vals = {l["step"]: l["val_loss"] for l in _metrics(workdir) if "val_loss" in l}
  best_dir = workdir / "checkpoints_best"
  assert [int(n) for n in os.listdir(best_dir) if n.isdigit()] == [min(vals, key=vals.get)]

  proc = run_cli("--mode=export", f"--workdir={workdir}", env=ONE_DEVICE)
  assert proc.returncode == 0, proc.stderr[-2000:]
  export = workdir / "export"
  assert {"params", "config.json", "tokenizer.json", "export.json"} <= set(os.listdir(export))
  full = checkpoint.directory_bytes(str(workdir / "checkpoints" / "40"))
  assert checkpoint.directory_bytes(str(export / "params")) < 0.5 * full  # no Adam moments

  config = checkpoint.workdir_config(str(workdir))
  target = abstract_params(config)
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  shardings = jax.tree.map(lambda _: one, target)
  exported = checkpoint.load_export(str(export), target, shardings)
  latest, _ = checkpoint.Checkpoints(str(workdir)).restore_params(target, shardings)
  for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(latest)):
    np.testing.assert_array_equal(a, b)


def test_export_to_an_unwritable_directory_is_a_one_line_error(tmp_path):
  workdir = tmp_path / "w"
  assert run_cli("--config=experiments/tiny.py", f"--workdir={workdir}",
                 "--config.train.num_steps=2", env=ONE_DEVICE).returncode == 0
  (tmp_path / "file").write_text("not a directory")
  proc = run_cli("--mode=export", f"--workdir={workdir}", f"--export_dir={tmp_path}/file/x",
                 env=ONE_DEVICE)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert "pass a writable --export_dir" in proc.stderr


def test_export_without_a_checkpoint_is_a_one_line_error(tmp_path):
  proc = run_cli("--mode=export", f"--workdir={tmp_path}", env=ONE_DEVICE)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  assert "config.json not found" in proc.stderr

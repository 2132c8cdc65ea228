"""Checkpoints: exact resume after SIGKILL and SIGTERM, other meshes, NaN, keep-best, export
(the fault cases are in checkpoint_faults_test.py)."""

import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
  ONE_DEVICE,
  finalized_steps,
  one_line_error,
  run_cli,
  start_cli,
  tiny_config,
  wait_for,
)

from gptjax import checkpoint, export, inference, loop, optim, sharding, storage, train
from gptjax import config as config_lib
from gptjax.errors import UserError
from gptjax.model import GPT, GPTConfig, abstract_params

STEPS = 200
ARGS = [
  "--config=experiments/tiny.py",
  f"--config.train.num_steps={STEPS}",
  "--config.train.log_every=1",
  "--config.train.eval_every=50",
  "--config.checkpoint.every=25",
  "--config.model.dropout=0.1",
]
EXACT = ("loss", "lr", "grad_norm", "val_loss", "val_bpb")  # timing fields differ, these not


def _metrics(workdir):
  lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return [{k: l[k] for k in ("step", *EXACT) if k in l} for l in lines]


def _start(workdir, *extra):
  return start_cli(*ARGS, f"--workdir={workdir}", *extra, env=ONE_DEVICE)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  proc = run_cli(*ARGS, f"--workdir={workdir}", env=ONE_DEVICE)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return _metrics(workdir)


@pytest.mark.slow
def test_sigkill_then_restart_gives_the_uninterrupted_metrics_bit_for_bit(tmp_path, uninterrupted):
  workdir = tmp_path / "w"
  proc = _start(workdir)
  try:
    wait_for(proc, lambda: len(finalized_steps(workdir)) >= 2)
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


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_the_resumed_run_matches(tmp_path, uninterrupted):
  workdir = tmp_path / "w"
  proc = _start(workdir)
  try:
    wait_for(proc, lambda: len(finalized_steps(workdir)) >= 1)
    time.sleep(0.05)  # mid-interval, between two periodic checkpoints
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
  finally:
    proc.kill()
  assert proc.returncode == 0, err[-2000:]
  stopped = int(out.split("saved checkpoint ")[1].split()[0])
  assert "SIGTERM received" in out and stopped in finalized_steps(workdir)
  assert stopped < STEPS
  rerun = run_cli(*ARGS, f"--workdir={workdir}", env=ONE_DEVICE)
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  assert f"resumed from checkpoint {stopped}" in rerun.stdout
  assert _metrics(workdir) == uninterrupted


@pytest.mark.slow
def test_nan_stops_the_run_and_leaves_only_finite_checkpoints(tmp_path):
  workdir = tmp_path / "w"
  proc = run_cli(
    "--config=experiments/tiny.py",
    f"--workdir={workdir}",
    "--config.optim.lr=1e6",
    "--config.optim.warmup_steps=0",
    "--config.checkpoint.every=1",
    "--config.train.num_steps=50",
    env=ONE_DEVICE,
  )
  assert proc.returncode == 1
  error = [l for l in proc.stderr.splitlines() if l.startswith("gptjax: error:")]
  assert len(error) == 1 and "loss became nan" in error[0] and "at step" in error[0], error
  bad_step = int(error[0].split("at step ")[1].split(";")[0])
  saved = finalized_steps(workdir)
  assert saved and max(saved) < bad_step
  config = config_lib.load_saved(str(workdir))
  target = abstract_params(config)
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  params, meta = checkpoint.Checkpoints(str(workdir)).restore_params(
    target, jax.tree.map(lambda _: one, target)
  )
  assert meta["step"] == max(saved)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


@pytest.mark.slow
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


def test_a_checkpoint_that_does_not_fit_the_config_names_the_difference(tmp_path):
  """A resume (Checkpoints.restore, as training's restore_or_init calls it) under another
  shape, optimizer or layer layout names the first difference, and sets nothing aside."""
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])

  def state(c, abstract=False):
    model, tx = GPT(GPTConfig.from_config(c.model, 66)), optim.make(c.optim, 100)
    init = lambda: train.init_state(model, tx, c.seed)
    return jax.eval_shape(init) if abstract else init()

  c = tiny_config(checkpoint__async_save=False)
  saved = checkpoint.Checkpoints(str(tmp_path), c.checkpoint)
  saved.save(state(c).replace(step=jnp.int32(2)), {"step": 2})
  saved.close()
  for overrides, fragments in [
    (
      {"model__d_model": 64},
      ["checkpoint 2", "parameter h_0/attn/key/bias has shape (2, 16)", "the config makes (2, 32)"],
    ),
    ({"optim__grad_clip": 0}, ["optimizer state of another structure"]),  # no clipping state
    ({"model__scan_layers": True}, ["set --config.model.scan_layers=False as it was trained"]),
  ]:
    abstract = state(tiny_config(**overrides), abstract=True)
    with pytest.raises(UserError) as e:
      checkpoint.Checkpoints(str(tmp_path), c.checkpoint).restore(
        abstract, jax.tree.map(lambda _: one, abstract)
      )
    assert all(f in str(e.value) for f in fragments), str(e.value)
  assert os.listdir(tmp_path / "checkpoints") == ["2"]  # nothing was set aside


@pytest.mark.slow
def test_export_is_params_only_and_keep_best_keeps_the_lowest_val_loss(tmp_path):
  workdir = tmp_path / "w"
  proc = run_cli(
    "--config=experiments/tiny.py",
    f"--workdir={workdir}",
    "--config.train.num_steps=40",
    "--config.train.eval_every=10",
    "--config.checkpoint.every=10",
    "--config.checkpoint.keep=2",
    "--config.checkpoint.keep_best=true",
    env=ONE_DEVICE,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert finalized_steps(workdir) == [30, 40]
  vals = {l["step"]: l["val_loss"] for l in _metrics(workdir) if "val_loss" in l}
  best_dir = workdir / "checkpoints_best"
  assert [int(n) for n in os.listdir(best_dir) if n.isdigit()] == [min(vals, key=vals.get)]

  proc = run_cli("--mode=export", f"--workdir={workdir}", env=ONE_DEVICE)
  assert proc.returncode == 0, proc.stderr[-2000:]
  export = workdir / "export"
  assert {"params", "config.json", "tokenizer.json", "export.json"} <= set(os.listdir(export))
  full = storage.size(str(workdir / "checkpoints" / "40"))
  assert storage.size(str(export / "params")) < 0.5 * full  # no Adam moments

  config = config_lib.load_saved(str(workdir))
  target = abstract_params(config)
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  shardings = jax.tree.map(lambda _: one, target)
  exported = inference.load_export(str(export), target, shardings)
  latest, _ = checkpoint.Checkpoints(str(workdir)).restore_params(target, shardings)
  for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(latest)):
    np.testing.assert_array_equal(a, b)


def _best(workdir, target, shardings):
  """(step, val_loss, params) held in checkpoints_best/, read as a workdir of its own."""
  steps = [int(n) for n in os.listdir(workdir / "checkpoints_best") if n.isdigit()]
  reader = workdir / "best_reader"
  if not reader.exists():
    reader.mkdir()
    os.symlink(workdir / "checkpoints_best", reader / "checkpoints")
  params, meta = checkpoint.Checkpoints(str(reader)).restore_params(target, shardings)
  assert steps == [meta["step"]], steps  # exactly one, the one restored
  return meta["step"], meta["val_loss"], params


@pytest.mark.slow
def test_keep_best_after_a_resume_compares_with_the_kept_best(tmp_path):
  """A resumed run (a new Checkpoints) reads the best val loss from checkpoints_best/: a worse
  eval never replaces it, a better one does; a resume from before the best forgets it."""
  c = tiny_config(checkpoint__keep_best=True, checkpoint__async_save=False)
  model = GPT(GPTConfig.from_config(c.model, 50))
  tx = optim.make(c.optim, 100)
  state = train.init_state(model, tx, 0)
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  shardings = jax.tree.map(lambda _: one, abstract)

  def at(step):  # the state at `step`, its params marked with the step
    return state.replace(
      step=jnp.int32(step), params=jax.tree.map(lambda x: x + step, state.params)
    )

  def saved_at(params):
    return int(round(float(params["ln_f"]["scale"][0]))) - 1  # ln_f starts at ones

  first = checkpoint.Checkpoints(str(tmp_path), c.checkpoint)
  for step, val_loss in ((10, 2.0), (20, 1.5), (30, 1.8)):
    first.save(at(step), {"step": step})
    first.save_best(at(step), {"step": step}, val_loss)
  first.close()
  step, val_loss, params = _best(tmp_path, abstract.params, shardings.params)
  assert (step, val_loss, saved_at(params)) == (20, 1.5, 20)

  resumed = checkpoint.Checkpoints(str(tmp_path), c.checkpoint)  # as a resumed run makes it
  restored, meta = resumed.restore(abstract, shardings)
  assert meta["step"] == 30 and int(restored.step) == 30
  resumed.save_best(at(40), {"step": 40}, 1.6)  # worse than the kept 1.5: not kept
  resumed.wait()
  assert _best(tmp_path, abstract.params, shardings.params)[:2] == (20, 1.5)
  resumed.save_best(at(50), {"step": 50}, 1.2)  # better: replaces it
  resumed.close()
  step, val_loss, params = _best(tmp_path, abstract.params, shardings.params)
  assert (step, val_loss, saved_at(params)) == (50, 1.2, 50)

  # The newest checkpoint (30) predates that best (50): a run resumed there has not reached
  # it, forgets it, and keeps its own next eval whatever the loss.
  again = checkpoint.Checkpoints(str(tmp_path), c.checkpoint)
  assert again.restore(abstract, shardings)[1]["step"] == 30
  assert not [n for n in os.listdir(tmp_path / "checkpoints_best") if n.isdigit()]
  again.save_best(at(40), {"step": 40}, 1.6)
  again.close()
  step, val_loss, params = _best(tmp_path, abstract.params, shardings.params)
  assert (step, val_loss, saved_at(params)) == (40, 1.6, 40)


@pytest.mark.slow
def test_export_to_an_unwritable_directory_is_named(tmp_path, trained_tiny):
  (tmp_path / "file").write_text("not a directory")
  with pytest.raises(UserError, match="pass a writable --export_dir$"):
    export.export(str(trained_tiny), f"{tmp_path}/file/x")


def test_export_without_a_checkpoint_is_named(tmp_path):
  with pytest.raises(UserError, match="config.json not found"):
    export.export(str(tmp_path))


# --- Faults: nothing lost, ever -------------------------------------------------------------

TINY = "--config=experiments/tiny.py"


@pytest.mark.slow
def test_a_state_that_turns_nan_is_never_saved(tmp_path):
  # eps=0: Adam divides 0 by 0 for the embedding rows no batch touches. The loss of step 1
  # (computed before the update) is finite; the state it leaves is not.
  proc = run_cli(
    TINY,
    f"--workdir={tmp_path}/w",
    "--config.optim.eps=0",
    "--config.checkpoint.every=1",
    "--config.train.num_steps=5",
    env=ONE_DEVICE,
  )
  line = one_line_error(proc)
  assert "became NaN or inf at step 1" in line and "nothing from this state was saved" in line
  assert finalized_steps(tmp_path / "w") == []


@pytest.mark.slow
def test_a_bad_config_value_stops_the_cli_before_anything_is_written(tmp_path):
  """The CLI contract of validate(): one line, exit 1, nothing in the workdir."""
  line = one_line_error(
    run_cli(TINY, f"--workdir={tmp_path}/w", "--config.optim.lr=nan", env=ONE_DEVICE)
  )
  assert "config.optim.lr=nan is not a finite number" in line
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_non_finite_hyperparameters_are_refused():
  for key in (
    "optim.lr",
    "optim.min_lr",
    "optim.b2",
    "optim.eps",
    "model.dropout",
    "model.norm_eps",
  ):
    for value in (float("nan"), float("inf"), -float("inf")):
      c = tiny_config(**{key.replace(".", "__"): value})
      with pytest.raises(UserError, match=f"config.{key}=.* is not a finite number"):
        config_lib.validate(c)


def test_a_start_without_a_checkpoint_sets_the_earlier_metrics_aside(tmp_path, capsys):
  """A run killed before its first checkpoint and run again logged its steps twice."""
  workdir = tmp_path / "w"
  workdir.mkdir()
  earlier = '{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 8.0}\n'
  (workdir / "metrics.jsonl").write_text(earlier)
  loop.train_and_evaluate(tiny_config(train__num_steps=2, train__log_every=1), str(workdir))
  steps = [json.loads(line)["step"] for line in open(workdir / "metrics.jsonl")]
  assert steps[0] == 1 and steps.count(1) == 1 and steps == sorted(steps)
  [aside] = workdir.glob("metrics.*.unsaved.jsonl")
  assert aside.read_text() == earlier and f"metrics moved to {aside}" in capsys.readouterr().out

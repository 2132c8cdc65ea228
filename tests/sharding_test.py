"""Meshes, rules and shardings on 8 simulated CPU devices (two processes over gloo, matching
one process with the same devices, train on a gs:// workdir in gcs_test.py)."""

import jax
import numpy as np
import pytest
from conftest import free_port, one_line_error, run_cli, tiny_config

from gptjax import sharding, train
from gptjax.errors import UserError

TINY = "--config=experiments/tiny.py"


def _config(**overrides):
  # 8 heads of 4 and a 128-row padded vocab: every dimension splits 8 ways.
  base = dict(model__n_head=8, model__dropout=0.1, train__batch_size=16, optim__grad_accum=2)
  return tiny_config(**{**base, **overrides})


def _mesh(c, data=1, fsdp=1, tensor=1, devices=None):
  c.mesh.shape.update(dict(data=data, fsdp=fsdp, tensor=tensor))
  return sharding.make_mesh(c.mesh, devices)


def _run(c, mesh, steps=10):
  """Trains `steps` steps on fixed random batches; returns the losses and a final eval loss."""
  s = train.setup(c, 60, mesh)
  state = s.init(c.seed)
  rng = np.random.default_rng(0)
  losses = []
  for _ in range(steps):
    batch = rng.integers(0, 60, s.batch_shape).astype(np.int32)
    state, m = s.train_step(state, s.batch(batch[s.rows()]))
    losses.append(float(m["loss"]))
  return np.array(losses), float(s.eval_step(state.params, s.batch(batch[s.rows()])))


@pytest.fixture(scope="module")
def one_device_run():
  c = _config()
  return _run(c, _mesh(c, devices=jax.devices()[:1]))


@pytest.mark.parametrize(
  "shape",
  [dict(data=8), dict(fsdp=8), dict(tensor=8), dict(data=2, fsdp=2, tensor=2)],
  ids=["data8", "fsdp8", "tensor8", "2x2x2"],
)
@pytest.mark.slow
def test_losses_match_the_one_device_run(shape, one_device_run):
  c = _config()
  losses, eval_loss = _run(c, _mesh(c, **shape))
  np.testing.assert_allclose(losses, one_device_run[0], rtol=1e-5)
  np.testing.assert_allclose(eval_loss, one_device_run[1], rtol=1e-5)
  assert losses[-1] < losses[0]  # it trained


@pytest.mark.slow
def test_fsdp_splits_parameters_and_adam_state_eight_ways():
  c = _config(model__d_model=128)
  s = train.setup(c, 60, _mesh(c, fsdp=8))
  state = s.init(c.seed)
  leaves = jax.tree.leaves(state.params)
  total = sum(x.nbytes for x in leaves)
  on_device0 = sum(x.addressable_shards[0].data.nbytes for x in leaves)
  # Only the biases without an embed dimension (qkv, mlp up) stay whole: 3% here, 0.4% in
  # GPT-2 small.
  replicated = sum(x.nbytes for x in leaves if x.sharding.is_fully_replicated)
  assert on_device0 == (total - replicated) / 8 + replicated
  assert abs(on_device0 / (total / 8) - 1) < 0.05
  kernel = state.params["h_0"]["mlp"]["up"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert kernel.addressable_shards[0].data.shape == (128 // 8, 512)
  mu = state.opt_state[1][0].mu["h_0"]["mlp"]["up"]["kernel"]  # Adam's moments follow
  assert mu.sharding == kernel.sharding
  mem = s.memory()
  assert mem["params"] == on_device0 and mem["opt_state"] >= 2 * mem["params"]
  assert mem["temp"] > 0


@pytest.mark.slow
def test_tensor_parallel_splits_heads_mlp_and_vocab():
  c = _config()
  s = train.setup(c, 60, _mesh(c, data=2, tensor=4))
  specs = jax.tree.map(lambda x: x.spec, s.state_shardings.params)
  P = jax.sharding.PartitionSpec
  assert specs["h_0"]["attn"]["query"]["kernel"] == P("fsdp", "tensor", None)
  assert specs["h_0"]["attn"]["out"]["kernel"] == P("tensor", None, "fsdp")
  assert specs["h_0"]["mlp"]["down"]["kernel"] == P("tensor", "fsdp")
  assert specs["wte"]["embedding"] == P("tensor", "fsdp")
  assert s.batch_sharding.spec == P(("data", "fsdp"), None)


def test_mesh_fills_the_remaining_devices_and_rejects_a_bad_product():
  c = _config()
  assert dict(_mesh(c, data=-1, tensor=2).shape) == {"data": 4, "fsdp": 1, "tensor": 2}
  with pytest.raises(UserError, match=r"needs 12 devices but 8"):
    _mesh(c, data=3, fsdp=2, tensor=2)
  with pytest.raises(UserError, match=r"needs a multiple of 3 devices"):
    _mesh(c, data=-1, tensor=3)
  c.mesh.dcn_shape.data = 2  # one process: there is no second host to split over
  with pytest.raises(UserError, match=r"dcn_shape=\(data=2, fsdp=1, tensor=1\) does not fit"):
    _mesh(c, data=-1)


def test_meshes_that_do_not_fit_the_tiny_model_are_named():
  """What training checks before compiling (make_mesh, then train.setup's batch and
  parameter checks), on the tiny experiment as the CLI runs it."""

  def refused(fragments, c, **shape):
    with pytest.raises(UserError) as e:
      train.setup(c, 66, _mesh(c, **shape), compile=False)
    assert all(f in str(e.value) for f in fragments), str(e.value)

  refused(["needs 3 devices but 8", "--config.mesh.shape"], tiny_config(), data=3)
  refused(
    ["batch_size=12", "data-parallel size 8", "data=8"], tiny_config(train__batch_size=12), data=8
  )
  refused(  # tiny has 2 heads: 8-way tensor parallelism cannot split them
    ["parameter h_0/attn/key/bias", "heads dimension 0 of size 2", "tensor=8"],
    tiny_config(),
    data=1,
    tensor=8,
  )


@pytest.mark.slow
def test_cli_error_when_the_coordinator_cannot_be_reached(tmp_path):
  proc = run_cli(
    TINY,
    f"--workdir={tmp_path}/w",
    f"--config.distributed.coordinator_address=127.0.0.1:{free_port()}",
    "--config.distributed.num_processes=2",
    "--config.distributed.process_id=1",
    "--config.distributed.timeout_s=3",
    timeout=120,
  )
  one_line_error(proc, "could not reach the coordinator at 127.0.0.1:", "within 3s")


@pytest.mark.slow
def test_scan_layers_and_the_chunked_loss_train_on_2x2x2_as_on_one_device():
  """scan_layers (stacked layers) with the fused head + loss (vocab split over tensor),
  gradient accumulation and dropout, against scan_layers alone with whole logits. (Scanned
  dropout masks differ from the loop's, so the loop's one-device run is not the reference.)"""
  c = _config(model__scan_layers=True, train__loss_chunk=8)
  s = train.setup(c, 60, _mesh(c, data=2, fsdp=2, tensor=2), compile=False)
  P = jax.sharding.PartitionSpec
  # The stacked "layers" axis stays whole: every device holds its shard of every layer.
  assert s.state_shardings.params["h"]["mlp"]["up"]["kernel"].spec == P(None, "fsdp", "tensor")
  losses, eval_loss = _run(c, _mesh(c, data=2, fsdp=2, tensor=2), steps=4)
  one_losses, one_eval = _run(
    _config(model__scan_layers=True), _mesh(c, devices=jax.devices()[:1]), steps=4
  )
  np.testing.assert_allclose(losses, one_losses, rtol=1e-5)
  np.testing.assert_allclose(eval_loss, one_eval, rtol=1e-5)

"""int8 inference: the round trip's error bound, the int8 model's layout, quality against
the float model, a mesh, export, chat, and errors. The serving engine's int8 cache is
checked against the model's own in engine_test (logits after every chunk)."""

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ONE_DEVICE, run_cli, tiny_config

from gptjax import config as config_lib
from gptjax import decode, export, inference, loop, quantize, sharding
from gptjax.errors import UserError
from gptjax.layers import SCALE, dequantize
from gptjax.layers import quantize as int8
from gptjax.model import abstract_params

INT8 = quantize.Quant("int8")
BOTH = quantize.Quant("int8", "int8")


@pytest.fixture(scope="module")
def loaded(trained_tiny):
  return inference.load(str(trained_tiny))


@pytest.mark.parametrize(
  "shape, axes", [((64, 4, 8), (0,)), ((4, 8, 64), (0, 1)), ((50, 32), (1,))]
)
def test_the_round_trip_is_within_half_a_step(shape, axes):
  spread = jnp.linspace(0.01, 3, shape[-1]).reshape((1,) * (len(shape) - 1) + shape[-1:])
  w = jax.random.normal(jax.random.PRNGKey(0), shape) * spread
  q, scale = int8(w, axes)
  assert q.dtype == jnp.int8 and scale.shape == tuple(
    n for i, n in enumerate(shape) if i not in axes
  )
  error = jnp.abs(w - dequantize(q, scale, axes))
  assert bool(jnp.all(error <= jnp.expand_dims(scale, axes) / 2 * (1 + 1e-6)))
  assert int(jnp.max(jnp.abs(q))) == 127  # the range is used


@pytest.mark.parametrize("scan", [False, True])
def test_quantized_params_have_the_int8_models_layout(scan):
  config = tiny_config(model__scan_layers=scan, model__vocab_size=65, model__tie_embeddings=scan)
  params = jax.tree.map(jnp.ones_like, abstract_params(config))
  got = jax.eval_shape(quantize.quantize_params, params)
  config.model.quant = "int8"
  want = abstract_params(config)
  shape = lambda t: jax.tree.map(lambda x: (x.shape, jnp.dtype(x.dtype).name), t)
  assert shape(got) == shape(want)
  kernels = [x for p, x in jax.tree_util.tree_leaves_with_path(got) if p[-1].key == "kernel"]
  assert kernels and all(x.dtype == jnp.int8 for x in kernels)
  table = got["wte"]
  assert table["embedding"].dtype == jnp.int8
  assert table["embedding" + SCALE].shape == table["embedding"].shape[:1]  # one per row


def test_int8_weights_keep_the_models_predictions(loaded):
  """Teacher-forced on text the model did not train on: top-1 agreement >= 99% and the loss
  within 0.5% with int8 weights, 1% with the KV cache in int8 too (through decoding)."""
  tok = loaded.tokenizer
  text = "KING RICHARD III:\nNow is the winter of our discontent made glorious summer."
  ids = np.array([tok.encode(text).tolist()[:32]], np.int32)
  q = inference.quantized(loaded, INT8)
  f = np.asarray(loaded.model.apply({"params": loaded.params}, ids), np.float64)
  g = np.asarray(q.model.apply({"params": q.params}, ids), np.float64)
  assert np.mean(f.argmax(-1) == g.argmax(-1)) >= 0.99
  loss = lambda logits: (
    -np.mean(np.take_along_axis(jax.nn.log_softmax(logits[0, :-1]), ids[0, 1:, None], axis=-1))
  )
  assert abs(loss(g) / loss(f) - 1) <= 0.005
  # int8 KV too: the same tokens through the model's int8 cache (prefill writes each
  # token's keys and values, quantized, then attends over them)
  both = inference.quantized(loaded, BOTH)
  start = jnp.zeros((1,), jnp.int32)
  init = functools.partial(both.model.init, start_B=start)
  shapes = jax.eval_shape(init, jax.random.PRNGKey(0), ids)["cache"]
  assert {jnp.dtype(x.dtype).name for x in jax.tree.leaves(shapes)} == {"int8", "float32", "int32"}
  cache = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
  variables = {"params": both.params, "cache": cache}
  h, _ = both.model.apply(variables, ids, jnp.arange(32)[None], start_B=start, mutable=["cache"])
  h = np.asarray(h, np.float64)
  assert np.mean(f.argmax(-1) == h.argmax(-1)) >= 0.99
  assert abs(loss(h) / loss(f) - 1) <= 0.01


def test_quantized_params_lay_out_over_a_mesh(trained_tiny):
  config = config_lib.load_saved(str(trained_tiny))
  config.mesh.shape.update(dict(data=1, fsdp=4, tensor=2))
  mesh = sharding.make_mesh(config.mesh)
  split = inference.load(str(trained_tiny), mesh=mesh, quant=BOTH)
  one = inference.load(str(trained_tiny), quant=BOTH)
  assert tuple(split.params["wte"]["embedding"].sharding.spec) == ("tensor", "fsdp")
  for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(split.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  tokens, start = decode.left_pad([one.tokenizer.encode("ROMEO:").tolist()] * 4)
  outs = []
  for run, m in ((one, None), (split, mesh)):  # the int8 cache split over the mesh too
    d = decode.Decoder(run.model, run.params, mesh=m, rules=sharding.rules(config.mesh))
    outs.append(np.asarray(d.generate(d.prefill(tokens, start, 8), 8, decode.Sampling(0.0))[1]))
  np.testing.assert_array_equal(outs[0], outs[1])


@pytest.mark.slow  # CLI subprocesses
def test_an_int8_export_is_small_and_loads_as_it_is(trained_tiny, tmp_path):
  out = tmp_path / "int8"
  proc = run_cli(
    f"--workdir={trained_tiny}", "--mode=export", "--quantize=int8", f"--export_dir={out}",
    env=ONE_DEVICE,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "in int8" in proc.stdout
  assert json.load(open(out / "config.json"))["model"]["quant"] == "int8"
  run = inference.load(str(out))
  assert run.model.cfg.quant == "int8" and run.params["wte"]["embedding"].dtype == jnp.int8
  want = inference.quantized(inference.load(str(trained_tiny)), INT8)
  for a, b in zip(jax.tree.leaves(want.params), jax.tree.leaves(run.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(UserError, match="already holds int8 weights"):
    inference.load(str(out), quant=INT8)
  with pytest.raises(UserError, match="cannot be written as Hugging Face's GPT-2"):
    export.export_hf(str(out), str(tmp_path / "hf"))
  with pytest.raises(UserError, match="holds int8 weights .* cannot start training"):
    inference.adopt_init_from(tiny_config(init_from=str(out)))
  beside = inference.load(str(tmp_path / "w"), tiny_config(init_from=str(out)))  # it samples
  assert beside.model.cfg.quant == "int8"
  proc = run_cli(f"--workdir={out}", "--mode=sample", "--max_new_tokens=8", "--kv_quant=int8")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "int8 KV cache" in proc.stderr
  fp32 = tmp_path / "fp32"
  proc = run_cli(f"--workdir={trained_tiny}", "--mode=export", f"--export_dir={fp32}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  # 0.53-0.60x here: orbax's per-array files weigh on a 2-layer model (GPT-2 small: 0.25x)
  assert directory_bytes(out / "params") < 0.7 * directory_bytes(fp32 / "params")


def test_a_run_whose_int8_export_outlives_its_checkpoints_loads_it_as_int8(trained_tiny, tmp_path):
  run = tmp_path / "run"
  shutil.copytree(trained_tiny, run)
  export.export(str(run), warn=lambda *_: None, weights="int8")  # run/export, in int8
  shutil.rmtree(run / "checkpoints")  # run/config.json still says float
  loaded = inference.load(str(run))
  assert loaded.where == "export" and loaded.model.cfg.quant == "int8"
  assert loaded.params["wte"]["embedding"].dtype == jnp.int8
  with pytest.raises(UserError, match="cannot be written as Hugging Face's GPT-2"):
    export.export_hf(str(run), str(tmp_path / "hf"))
  with pytest.raises(UserError, match="holds int8 weights .* cannot start training"):
    inference.init_from(str(run), loaded.model.cfg)


@pytest.mark.slow  # CLI subprocesses
def test_chat_runs_quantized(trained_tiny):
  proc = run_cli(
    f"--workdir={trained_tiny}", "--mode=chat", "--quantize=int8", "--kv_quant=int8",
    "--max_new_tokens=6", stdin="Good morrow.\n",
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "int8 weights, int8 KV cache" in proc.stderr


def directory_bytes(path) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


@pytest.mark.slow  # a CLI subprocess each
@pytest.mark.parametrize(
  "args, fragment",
  [
    (("--mode=sample", "--quantize=int4"), "--quantize=int4 is not a mode; use one of none, int8"),
    (("--mode=sample", "--kv_quant=fp8"), "--kv_quant=fp8 is not a mode"),
    (("--mode=export", "--kv_quant=int8"), "--kv_quant is for sample, chat and evaluate"),
    (("--mode=export", "--export_format=hf", "--quantize=int8"), "not --mode=export --export_fo"),
  ],
)
def test_bad_quantization_flags_are_one_line(trained_tiny, args, fragment):
  proc = run_cli(f"--workdir={trained_tiny}", *args)
  assert proc.returncode != 0 and fragment in proc.stderr
  assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_training_an_int8_model_is_refused(tmp_path):
  config = tiny_config(model__quant="int8")
  with pytest.raises(UserError, match="int8 weights or KV cache are for inference"):
    loop.prepare(config, str(tmp_path))

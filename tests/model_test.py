import dataclasses
import itertools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from gptjax.errors import UserError
from gptjax.model import GPT, GPTConfig, count_params


def _model(**overrides):
  c = tiny_config(**{f"model__{k}": v for k, v in overrides.items()})
  return GPT(GPTConfig.from_config(c.model, vocab_size=50))


def _init(model, seed=0):
  tokens = jnp.zeros((2, model.cfg.block_size), jnp.int32)
  return nn.meta.unbox(model.init(jax.random.PRNGKey(seed), tokens)["params"])


SWITCHES = list(
  itertools.product(
    ["layernorm", "rmsnorm"], ["learned", "rope"], ["gelu", "swiglu"], [True, False], [True, False]
  )
)


@pytest.mark.parametrize("norm,positions,activation,tie,bias", SWITCHES)
def test_output_shape_for_every_switch(norm, positions, activation, tie, bias):
  model = _model(
    norm=norm, positions=positions, activation=activation, tie_embeddings=tie, bias=bias
  )
  params = _init(model)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (3, 17), 0, 50)
  logits = model.apply({"params": params}, tokens)
  assert logits.shape == (3, 17, 64)  # vocab 50 padded to the multiple 64
  assert bool(jnp.all(jnp.isfinite(logits[..., :50])))


def test_switches_change_the_parameters():
  base = _init(_model())
  assert "wpe" in base and "wpe" not in _init(_model(positions="rope"))
  assert "lm_head" not in base and "lm_head" in _init(_model(tie_embeddings=False))
  assert "gate" in _init(_model(activation="swiglu"))["h_0"]["mlp"]
  assert (
    "bias" in base["h_0"]["ln_1"] and "bias" not in _init(_model(norm="rmsnorm"))["h_0"]["ln_1"]
  )
  assert "bias" not in _init(_model(bias=False))["h_0"]["attn"]["query"]


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_causality(positions):
  """Changing token t+1 leaves the logits at positions <= t unchanged."""
  model = _model(positions=positions)
  params = _init(model)
  tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 20), 0, 50)
  t = 9
  changed = tokens.at[:, t + 1].set((tokens[:, t + 1] + 1) % 50)
  a = model.apply({"params": params}, tokens)
  b = model.apply({"params": params}, changed)
  np.testing.assert_allclose(a[:, : t + 1], b[:, : t + 1], atol=1e-6)
  assert not np.allclose(a[:, t + 1 :], b[:, t + 1 :], atol=1e-6)


def test_padded_vocab_is_never_predicted():
  model = _model()
  logits = model.apply({"params": _init(model)}, jnp.zeros((1, 5), jnp.int32))
  assert float(jnp.max(logits[..., 50:])) < -1e30
  assert int(jnp.argmax(logits, -1).max()) < 50


def test_parameters_carry_logical_axes():
  model = _model()
  boxed = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
  specs = nn.get_partition_spec(boxed)
  assert tuple(specs["wte"]["embedding"]) == ("vocab", "embed")
  assert tuple(specs["h_0"]["attn"]["query"]["kernel"]) == ("embed", "heads", "kv")
  assert tuple(specs["h_0"]["mlp"]["up"]["kernel"]) == ("embed", "mlp")
  unnamed = [
    p
    for p, s in jax.tree_util.tree_leaves_with_path(
      specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
    )
    if s is None
  ]
  assert not unnamed


def test_dropout_is_active_only_in_training():
  model = _model(dropout=0.5)
  params = _init(model)
  tokens = jnp.ones((1, 8), jnp.int32)
  a = model.apply({"params": params}, tokens)
  np.testing.assert_array_equal(a, model.apply({"params": params}, tokens))
  b = model.apply(
    {"params": params}, tokens, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)}
  )
  assert not np.allclose(a, b)


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params():
  model = _model(dtype="bfloat16")
  params = _init(model)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  assert model.apply({"params": params}, jnp.ones((1, 8), jnp.int32)).dtype == jnp.bfloat16


def test_gpt2_small_parameter_count():
  """GPT-2 small with its 50257-token vocabulary has the published 124M parameters."""
  c = tiny_config(
    model__n_layer=12,
    model__n_head=12,
    model__d_model=768,
    model__block_size=1024,
    model__vocab_multiple=1,
  )
  model = GPT(GPTConfig.from_config(c.model, vocab_size=50257))
  shapes = jax.eval_shape(lambda: _init(model))
  assert count_params(shapes) == 124_439_808


@pytest.mark.parametrize("policy", ["dots", "dots_no_batch", "full"])
@pytest.mark.slow
def test_remat_changes_memory_not_results(policy):
  """Every remat policy gives the plain model's loss and gradients (same parameter tree)."""
  import optax

  base = GPTConfig.from_config(tiny_config().model, 65)
  remat = dataclasses.replace(base, remat=policy)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 33), 0, 65)
  params = nn.meta.unbox(GPT(base).init(jax.random.PRNGKey(0), tokens[:, :-1])["params"])

  def loss(params, cfg):
    logits = GPT(cfg).apply({"params": params}, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  (l0, g0), (l1, g1) = (
    jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, c) for c in (base, remat)
  )
  assert jax.tree.structure(
    GPT(remat).init(jax.random.PRNGKey(0), tokens[:, :-1])
  ) == jax.tree.structure(GPT(base).init(jax.random.PRNGKey(0), tokens[:, :-1]))
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g0, g1)


@pytest.mark.parametrize("remat", ["none", "full"])
@pytest.mark.slow
def test_scan_layers_equals_the_loop_over_stacked_parameters(remat):
  """nn.scan over the blocks: the same loss and gradients from the same (stacked) weights."""
  import optax

  from gptjax.model import per_layer, to_layout

  loop = dataclasses.replace(GPTConfig.from_config(tiny_config().model, 65), remat=remat)
  scan = dataclasses.replace(loop, scan_layers=True)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 33), 0, 65)
  boxed = jax.eval_shape(GPT(scan).init, jax.random.PRNGKey(0), tokens[:, :-1])["params"]
  kernel = boxed["h"]["mlp"]["up"]["kernel"]
  assert kernel.names == ("layers", "embed", "mlp") and kernel.value.shape == (2, 32, 128)
  init = jax.jit(GPT(loop).init)
  params = nn.meta.unbox(init(jax.random.PRNGKey(0), tokens[:, :-1])["params"])
  stacked = to_layout(params, scan)
  assert jax.tree.structure(stacked) == jax.tree.structure(nn.meta.unbox(boxed))

  def loss(params, cfg):
    logits = GPT(cfg).apply({"params": params}, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  l0, g0 = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, loop)
  l1, g1 = jax.jit(jax.value_and_grad(loss), static_argnums=1)(stacked, scan)
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g0, per_layer(g1, scan)
  )


def test_a_vocab_size_below_the_tokenizers_is_refused_by_name():
  with pytest.raises(UserError, match=re.escape("config.model.vocab_size=10 is smaller than")):
    GPTConfig.from_config(tiny_config(model__vocab_size=10).model, 66)
  assert GPTConfig.from_config(tiny_config(model__vocab_size=100).model, 66).vocab_size == 100

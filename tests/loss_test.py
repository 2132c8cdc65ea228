"""The cross-entropy and the fused, chunked LM head + cross-entropy."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from gptjax import config as config_lib
from gptjax import loss, optim, sharding, train
from gptjax.errors import UserError
from gptjax.model import GPT, GPTConfig, vocab_logits

# 50 real tokens padded to 64: the padding must never be predicted nor take gradient.
CFG = GPTConfig(
  vocab_size=50, padded_vocab=64, n_layer=1, n_head=1, d_model=16, d_ff=64, block_size=8
)


def test_cross_entropy_ignores_padding_and_smooths():
  logits = np.log(np.array([[[0.7, 0.2, 0.1, 0.0]]], np.float32) + 1e-30)
  targets = np.array([[0]])
  np.testing.assert_allclose(loss.cross_entropy(logits, targets, 3), [[-np.log(0.7)]], rtol=1e-5)
  smooth = loss.cross_entropy(logits, targets, 3, label_smoothing=0.1)
  expected = 0.9 * -np.log(0.7) + 0.1 * -np.mean(np.log([0.7, 0.2, 0.1]))
  np.testing.assert_allclose(smooth, [[expected]], rtol=1e-5)


def _inputs(dtype=jnp.float32):
  r = np.random.default_rng(0)
  x = jnp.asarray(r.normal(size=(3, 8, 16)), dtype)
  w = jnp.asarray(r.normal(size=(64, 16)) * 0.5, jnp.float32)
  targets = jnp.asarray(r.integers(0, 50, (3, 8)))
  weights = jnp.asarray(r.integers(0, 2, (3, 8)), jnp.float32).at[0, 0].set(1)
  return x, w, targets, weights


def _plain(cfg, x, w, targets, weights, label_smoothing):
  per_token = loss.cross_entropy(
    vocab_logits(x, w, cfg, jnp.float32), targets, cfg.vocab_size, label_smoothing
  )
  return jnp.sum(weights * per_token) / jnp.sum(weights)


@pytest.mark.parametrize("chunk", [1, 4, 8])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True], ids=["mean", "weighted"])
def test_fused_loss_and_gradients_equal_the_plain_ones(chunk, label_smoothing, weighted):
  x, w, targets, weights = _inputs()
  if not weighted:
    weights = jnp.ones_like(weights)
  plain = jax.value_and_grad(_plain, (1, 2))(CFG, x, w, targets, weights, label_smoothing)
  fused = jax.jit(
    jax.value_and_grad(
      lambda x, w: loss.fused_cross_entropy(
        x, w, targets, CFG, chunk, label_smoothing, weights if weighted else None
      ),
      (0, 1),
    )
  )(x, w)
  np.testing.assert_allclose(fused[0], plain[0], rtol=1e-6)
  for got, want in zip(fused[1], plain[1]):
    np.testing.assert_allclose(got, want, atol=1e-7)
  assert np.all(fused[1][1][CFG.vocab_size :] == 0)  # padding rows get no gradient
  # Without differentiation (evaluation) the forward-only path gives the same number.
  np.testing.assert_allclose(
    loss.fused_cross_entropy(
      x, w, targets, CFG, chunk, label_smoothing, weights if weighted else None
    ),
    plain[0],
    rtol=1e-6,
  )


def test_fused_loss_in_bfloat16_keeps_float32_logits():
  cfg = GPTConfig(**{**CFG.__dict__, "dtype": jnp.bfloat16})
  x, w, targets, _ = _inputs(jnp.bfloat16)
  ref, (ref_dx, ref_dw) = jax.value_and_grad(_plain, (1, 2))(
    CFG, x.astype(jnp.float32), w, targets, jnp.ones(targets.shape), 0.0
  )
  got, (dx, dw) = jax.value_and_grad(
    lambda x, w: loss.fused_cross_entropy(x, w, targets, cfg, 4), (0, 1)
  )(x, w)
  assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
  np.testing.assert_allclose(got, ref, rtol=1e-2)
  np.testing.assert_allclose(dx.astype(jnp.float32), ref_dx, atol=2e-3)
  np.testing.assert_allclose(dw, ref_dw, atol=2e-3)


def test_fused_loss_needs_a_chunk_that_divides_the_sequence():
  x, w, targets, _ = _inputs()
  with pytest.raises(ValueError, match="chunk 3 does not divide the sequence length 8"):
    loss.fused_cross_entropy(x, w, targets, CFG, 3)
  c = tiny_config(train__loss_chunk=5)
  with pytest.raises(
    UserError,
    match=r"loss_chunk=5 must be 0 \(off\) or divide "
    r"config.model.block_size=32; e.g. .*loss_chunk=32",
  ):
    config_lib.validate(c)


@pytest.mark.slow
def test_training_with_a_chunked_loss_matches_the_whole_logits():
  """Same losses, gradient norms and parameters after 3 steps with an untied lm_head (the
  tied head, sharded 2x2x2 through train.setup, is in sharding_test)."""
  c = tiny_config(model__tie_embeddings=False, model__n_layer=1)
  model = GPT(GPTConfig.from_config(c.model, 60))
  tx = optim.make(c.optim, 10)
  batches = np.random.default_rng(0).integers(0, 60, (3, 8, 33)).astype(np.int32)
  results = []
  for chunk in (0, 8):
    step = jax.jit(
      functools.partial(
        train.train_step,
        model=model,
        tx=tx,
        loss_chunk=chunk,
        lr_schedule=optim.schedule(c.optim, 10),
      )
    )
    state, ms = train.init_state(model, tx, 0), []
    for batch in batches:
      state, m = step(state, batch)
      ms.append((float(m["loss"]), float(m["grad_norm"])))
    results.append((ms, state.params))
  np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.slow
def test_a_chunked_loss_needs_less_step_memory():
  """A large vocabulary: the whole-logits step holds (B, T, V) float32 tensors."""
  temps = []
  for chunk in (0, 16):
    c = tiny_config(train__loss_chunk=chunk, model__vocab_size=8192, model__block_size=128)
    temps.append(train.setup(c, 60, sharding.make_mesh(c.mesh)).memory()["temp"])
  logits_bytes = 8 * 128 * 8192 * 4
  assert temps[1] < temps[0] - logits_bytes / 8  # a device's share of one logits tensor

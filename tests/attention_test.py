"""The explicit softmax attention that attention dropout (attn_dropout > 0, while training)
switches to: it equals the default path without dropout, and with dropout it follows its RNG
and stays causal."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from gptjax import attention
from gptjax.errors import UserError
from gptjax.model import GPT, GPTConfig

B, T, N, H = 2, 8, 2, 16


class _Explicit(nn.Module):
  """_explicit_attention needs a bound Dropout: a module around it."""

  rate: float

  @nn.compact
  def __call__(self, q, k, v, deterministic: bool):
    return attention._explicit_attention(q, k, v, nn.Dropout(self.rate), deterministic)


def _qkv(seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), (3, B, T, N, H))


def _naive(q, k, v):
  """softmax(q k^T / sqrt(H)) v per row and head, future positions masked, in float64."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  out = np.zeros_like(q)
  for b in range(B):
    for n in range(N):
      logits = q[b, :, n] @ k[b, :, n].T / np.sqrt(H)
      logits[np.triu_indices(T, 1)] = -np.inf
      probs = np.exp(logits - logits.max(-1, keepdims=True))
      out[b, :, n] = probs / probs.sum(-1, keepdims=True) @ v[b, :, n]
  return out


def test_without_dropout_it_equals_the_default_path_and_a_naive_reference():
  q, k, v = _qkv()
  want = _naive(q, k, v)
  default = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
  np.testing.assert_allclose(default, want, atol=1e-5)
  rng = {"dropout": jax.random.PRNGKey(1)}
  for rate, deterministic in ((0.2, True), (0.0, False)):  # dropout off either way
    got = _Explicit(rate).apply({}, q, k, v, deterministic, rngs=rng)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(got, default, atol=1e-5)


def test_with_dropout_the_rng_decides_and_rows_stay_causal():
  q, k, v = _qkv()
  run = lambda q, k, v, seed: _Explicit(0.5).apply(  # noqa: E731
    {}, q, k, v, False, rngs={"dropout": jax.random.PRNGKey(seed)}
  )
  out = run(q, k, v, 1)
  np.testing.assert_array_equal(out, run(q, k, v, 1))  # a function of its rng
  assert not np.allclose(out, run(q, k, v, 2))  # which it really uses
  assert not np.allclose(out, _naive(q, k, v), atol=1e-3)  # and drops something
  t = 5  # another key and value at position t: rows before t see none of it
  k2, v2 = k.at[:, t].add(3.0), v.at[:, t].add(3.0)
  changed = run(q, k2, v2, 1)
  np.testing.assert_array_equal(changed[:, :t], out[:, :t])
  assert not np.allclose(changed[:, t:], out[:, t:])


@pytest.mark.slow
def test_a_model_with_attention_dropout_stays_causal_while_training():
  """The whole model in training mode (the explicit path, as shakespeare_char's default
  attn_dropout=0.2 trains): a later token never changes an earlier position's logits."""
  cfg = GPTConfig.from_config(tiny_config(model__attn_dropout=0.2).model, 50)
  model = GPT(cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 32), 0, 50)
  params = model.init(jax.random.PRNGKey(0), tokens)
  apply = jax.jit(
    lambda tokens, seed: model.apply(
      params, tokens, deterministic=False, rngs={"dropout": jax.random.PRNGKey(seed)}
    )
  )
  logits = apply(tokens, 1)
  assert not np.allclose(logits, apply(tokens, 2))  # dropout is on
  np.testing.assert_array_equal(logits, apply(tokens, 1))
  eval_logits = model.apply(params, tokens)  # deterministic: the default path, no dropout
  assert not np.allclose(logits, eval_logits)
  t = 20
  later = tokens.at[:, t].set((tokens[:, t] + 1) % 50)
  changed = apply(later, 1)
  np.testing.assert_allclose(changed[:, :t], logits[:, :t], atol=1e-6)
  assert not np.allclose(changed[:, t:], logits[:, t:])


def test_cudnn_attention_off_a_gpu_is_refused_by_name():
  """--config.model.attention=cudnn on CPU (or with float32 compute) is one line naming it."""
  for dtype in (jnp.float32, jnp.bfloat16):
    with pytest.raises(UserError, match=re.escape("model.attention='cudnn' needs an NVIDIA GPU")):
      attention.resolve_implementation("cudnn", dtype)
  assert attention.resolve_implementation("auto", jnp.float32) == "xla"

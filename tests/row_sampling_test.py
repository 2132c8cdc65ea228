"""Per-row sampling: each row follows its own settings as decode.sample would, and its draw
depends on its seed and token count only."""

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import decode
from gptjax.row_sampling import TOP, logprobs_rows, sample_rows

V = 50


def _logits(b):
  return jax.random.normal(jax.random.PRNGKey(1), (b, V)) * 3


def _rows(logits, made, seed, temperature, top_k, top_p):
  arr = lambda x, dt: jnp.asarray(x, dt)
  return np.asarray(
    sample_rows(
      logits,
      arr(made, jnp.int32),
      arr(seed, jnp.uint32),
      arr(temperature, jnp.float32),
      arr(top_k, jnp.int32),
      arr(top_p, jnp.float32),
    )
  )


def test_each_row_samples_as_decode_sample_does_with_its_own_settings():
  logits = _logits(4)
  settings = [(0.0, 0, 1.0), (0.8, 10, 1.0), (1.3, 0, 0.7), (0.5, 3, 0.9)]
  temperature, top_k, top_p = (list(x) for x in zip(*settings))
  made, seed = [0, 3, 7, 1], [5, 6, 7, 8]
  got = _rows(logits, made, seed, temperature, top_k, top_p)
  for b, (t, k, p) in enumerate(settings):
    key = jax.random.fold_in(jax.random.PRNGKey(seed[b]), made[b])
    want = decode.sample(logits[b : b + 1], key, decode.Sampling(t, k, p))
    assert got[b] == int(want[0]), b


def test_a_rows_draw_does_not_depend_on_its_neighbours():
  logits = _logits(3)
  one = _rows(logits, [2, 2, 2], [9, 9, 9], [1.0, 1.0, 1.0], [0, 0, 0], [1.0, 1.0, 1.0])
  mixed = _rows(logits, [2, 0, 4], [9, 1, 3], [1.0, 0.0, 0.7], [0, 0, 5], [1.0, 1.0, 0.5])
  assert mixed[0] == one[0]
  assert mixed[1] == int(jnp.argmax(logits[1]))


def test_logprobs_are_the_models_and_only_where_asked():
  logits = _logits(3)
  token = jnp.array([4, 7, 9])
  live, want = jnp.array([True, True, False]), jnp.array([0, 2, 5])
  chosen, top_lp, top_ids = logprobs_rows(logits, token, live, want)
  full = jax.nn.log_softmax(logits, axis=-1)
  np.testing.assert_allclose(chosen, full[jnp.arange(3), token], rtol=1e-6)
  np.testing.assert_array_equal(top_ids[1], jnp.argsort(-full[1])[:TOP])
  none = logprobs_rows(logits, token, live, jnp.array([-1, -1, 5]))  # the asker is not live
  assert not np.any(np.asarray(none[0])) and not np.any(np.asarray(none[1]))

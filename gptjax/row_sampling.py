"""Sampling a batch whose rows are independent requests: each row's temperature, top-k,
top-p and random stream are its own values, not compile-time constants, so requests with
different settings share one compiled decode step (engine.py)."""

import jax
import jax.numpy as jnp

TOP = 5  # the most alternatives a token's logprobs report (OpenAI's limit for completions)


def sample_rows(logits_BxV, made_B, seed_B, temperature_B, top_k_B, top_p_B):
  """decode.sample with per-row settings: greedy where temperature is 0, else temperature,
  top-k then top-p, as decode.sample orders them. Row b's key is fold_in(seed_b, made_b)."""
  logits_BxV = logits_BxV.astype(jnp.float32)
  greedy_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  neg = jnp.finfo(jnp.float32).min
  v = logits_BxV.shape[-1]

  def sampled():
    scaled_BxV = logits_BxV / jnp.where(temperature_B > 0, temperature_B, 1.0)[:, None]
    sorted_BxV = -jnp.sort(-scaled_BxV, axis=-1)
    k_B = jnp.where((top_k_B > 0) & (top_k_B < v), top_k_B, v)
    kth_Bx1 = jnp.take_along_axis(sorted_BxV, (k_B - 1)[:, None], axis=-1)
    scaled_BxV = jnp.where(scaled_BxV < kth_Bx1, neg, scaled_BxV)
    sorted_BxV = jnp.where(sorted_BxV < kth_Bx1, neg, sorted_BxV)
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    keep_BxV = mass_before_BxV < top_p_B[:, None]
    cutoff_Bx1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    cutoff_Bx1 = jnp.where(top_p_B[:, None] < 1, cutoff_Bx1, neg)
    scaled_BxV = jnp.where(scaled_BxV < cutoff_Bx1, neg, scaled_BxV)
    keys = jax.vmap(lambda s, m: jax.random.fold_in(jax.random.PRNGKey(s), m))(seed_B, made_B)
    return jax.vmap(jax.random.categorical)(keys, scaled_BxV).astype(jnp.int32)

  # The sort costs a full pass over the vocabulary: only when some row samples.
  drawn_B = jax.lax.cond(jnp.any(temperature_B > 0), sampled, lambda: greedy_B)
  return jnp.where(temperature_B > 0, drawn_B, greedy_B)


def logprobs_rows(logits_BxV, token_B, live_B, want_B):
  """The model's log-probabilities (not the sampler's) of the chosen tokens, and the TOP
  likeliest alternatives; each pass over the vocabulary only when a live row asked."""
  b = token_B.shape[0]
  logprobs_BxV = lambda: jax.nn.log_softmax(logits_BxV, axis=-1)

  def chosen():
    return jnp.take_along_axis(logprobs_BxV(), token_B[:, None], axis=-1)[:, 0]

  def top():
    return tuple(jax.lax.top_k(logprobs_BxV(), TOP))

  chosen_B = jax.lax.cond(jnp.any(live_B & (want_B >= 0)), chosen, lambda: jnp.zeros((b,)))
  top_lp, top_ids = jax.lax.cond(
    jnp.any(live_B & (want_B > 0)),
    top,
    lambda: (jnp.zeros((b, TOP), jnp.float32), jnp.zeros((b, TOP), jnp.int32)),
  )
  return chosen_B, top_lp, top_ids

"""Next-token losses: cross-entropy from logits, and a fused head + cross-entropy in chunks.

The fused form never holds the (B, T, V) logits: for GPT-2 small at B=12, T=1024 those are
2.5 GB in float32 (and again for their gradient), the largest tensors of the step. It runs
the LM head a chunk of positions at a time and computes the gradients of the hidden states
and of the output embedding in the same pass (as Liger's fused linear cross-entropy does),
so the backward pass has no logits to keep or to recompute: the FLOPs equal the plain form.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from gptjax.model import GPTConfig, vocab_logits


def cross_entropy(logits_BxTxV, targets_BxT, vocab_size: int, label_smoothing: float = 0.0):
  """Per-token loss in nats, float32, shape (B, T); padded vocab entries never count."""
  logits_BxTxV = logits_BxTxV.astype(jnp.float32)
  return _from_lse(
    logits_BxTxV, jax.nn.logsumexp(logits_BxTxV, axis=-1), targets_BxT, vocab_size, label_smoothing
  )


def _from_lse(logits_BxTxV, lse_BxT, targets_BxT, vocab_size: int, label_smoothing: float):
  """cross_entropy given float32 logits and their logsumexp (the fused form reuses it)."""
  target_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
  loss_BxT = lse_BxT - target_BxT
  if label_smoothing:
    uniform_BxT = lse_BxT - jnp.mean(logits_BxTxV[..., :vocab_size], axis=-1)
    loss_BxT = (1 - label_smoothing) * loss_BxT + label_smoothing * uniform_BxT
  return loss_BxT


def fused_cross_entropy(
  x_BxTxD,
  w_VxD,
  targets_BxT,
  cfg: GPTConfig,
  chunk: int,
  label_smoothing: float = 0.0,
  weights_BxT=None,
  mean: bool = True,
):
  """Weighted mean next-token loss of logits x @ w.T, computed `chunk` positions at a time.

  x_BxTxD: final hidden states; w_VxD: output embedding (GPT.hidden_states and GPT.output_embedding).
  weights_BxT (default: all ones) weighs each position's loss, e.g. a loss mask; the result
  is sum(weights * loss) / sum(weights), or with mean=False sum(weights * loss) (the caller
  normalises over a larger batch). Equals cross_entropy(...) averaged, with float32
  logits. chunk must divide T.
  """
  _, T, _ = x_BxTxD.shape
  if T % chunk:
    raise ValueError(f"chunk {chunk} does not divide the sequence length {T}")
  if weights_BxT is None:
    weights_BxT = jnp.full(targets_BxT.shape, 1.0 / targets_BxT.size, jnp.float32)
  else:  # normalised here, so the gradients computed chunk by chunk need no later rescaling
    weights_BxT = weights_BxT.astype(jnp.float32)
    if mean:
      weights_BxT = weights_BxT / jnp.maximum(jnp.sum(weights_BxT), 1e-9)
  return _fused(cfg, chunk, label_smoothing, x_BxTxD, w_VxD, targets_BxT, weights_BxT)


def _by_chunk(a_BxT, n: int):
  """(B, T, ...) -> (n, B, T / n, ...): positions split, the batch (and its sharding) kept."""
  B, T = a_BxT.shape[:2]
  return a_BxT.reshape(B, n, T // n, *a_BxT.shape[2:]).swapaxes(0, 1)


def _unchunk(a_NxBxC):
  n, B, C = a_NxBxC.shape[:3]
  return a_NxBxC.swapaxes(0, 1).reshape(B, n * C, *a_NxBxC.shape[3:])


def _chunk_loss(cfg, label_smoothing, x_BxCxD, w_VxD, t_BxC, weights_BxC, with_grads: bool):
  """Weighted loss sum of one chunk; with_grads adds d(sum)/dx (B, C, D) and d(sum)/dw (V, D)."""
  logits_BxCxV = vocab_logits(x_BxCxD, w_VxD, cfg, out_dtype=jnp.float32)
  lse_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
  loss = jnp.sum(
    weights_BxC * _from_lse(logits_BxCxV, lse_BxC, t_BxC, cfg.vocab_size, label_smoothing)
  )
  if not with_grads:
    return loss
  # d loss / d logits = softmax - (1 - ls) * onehot(target) - ls * uniform over real tokens;
  # the softmax from the logsumexp already taken, not a second pass over the vocabulary.
  probs_BxCxV = jnp.exp(logits_BxCxV - lse_BxC[..., None])
  V = cfg.padded_vocab
  hit_BxCxV = jax.nn.one_hot(t_BxC, V, dtype=jnp.float32)
  dlogits_BxCxV = probs_BxCxV - (1 - label_smoothing) * hit_BxCxV
  if label_smoothing:
    real_1x1xV = (jnp.arange(V) < cfg.vocab_size)[None, None, :]
    dlogits_BxCxV -= label_smoothing / cfg.vocab_size * real_1x1xV
  dlogits_BxCxV = (weights_BxC[..., None] * dlogits_BxCxV).astype(cfg.dtype)
  dlogits_BxCxV = nn.with_logical_constraint(dlogits_BxCxV, ("batch", "length", "vocab"))
  dx_BxCxD = jnp.einsum(
    "bcv,vd->bcd", dlogits_BxCxV, w_VxD.astype(cfg.dtype), preferred_element_type=jnp.float32
  ).astype(x_BxCxD.dtype)
  dw_VxD = jnp.einsum(
    "bcv,bcd->vd", dlogits_BxCxV, x_BxCxD.astype(cfg.dtype), preferred_element_type=jnp.float32
  )
  return loss, dx_BxCxD, dw_VxD


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _fused(cfg, chunk, label_smoothing, x_BxTxD, w_VxD, targets_BxT, weights_BxT):
  n = x_BxTxD.shape[1] // chunk
  losses = jax.lax.map(
    lambda a: _chunk_loss(cfg, label_smoothing, a[0], w_VxD, a[1], a[2], with_grads=False),
    (_by_chunk(x_BxTxD, n), _by_chunk(targets_BxT, n), _by_chunk(weights_BxT, n)),
  )
  return jnp.sum(losses)


def _fused_fwd(cfg, chunk, label_smoothing, x_BxTxD, w_VxD, targets_BxT, weights_BxT):
  n = x_BxTxD.shape[1] // chunk

  def step(dw_VxD, a):
    loss, dx_BxCxD, dw_chunk = _chunk_loss(
      cfg, label_smoothing, a[0], w_VxD, a[1], a[2], with_grads=True
    )
    return dw_VxD + dw_chunk, (loss, dx_BxCxD)

  dw_VxD, (losses, dx_NxBxCxD) = jax.lax.scan(
    step,
    jnp.zeros(w_VxD.shape, jnp.float32),
    (_by_chunk(x_BxTxD, n), _by_chunk(targets_BxT, n), _by_chunk(weights_BxT, n)),
  )
  return jnp.sum(losses), (_unchunk(dx_NxBxCxD), dw_VxD.astype(w_VxD.dtype))


def _fused_bwd(cfg, chunk, label_smoothing, residuals, g):
  del cfg, chunk, label_smoothing
  dx_BxTxD, dw_VxD = residuals
  # None: no gradient for the targets or the weights (constants of the loss).
  return (g * dx_BxTxD).astype(dx_BxTxD.dtype), (g * dw_VxD).astype(dw_VxD.dtype), None, None


_fused.defvjp(_fused_fwd, _fused_bwd)

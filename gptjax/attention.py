"""Causal multi-head self-attention, with rotary positions as an option.

The core is `jax.nn.dot_product_attention`, whose `implementation` picks XLA or cuDNN flash
attention. Attention-probability dropout needs the probabilities, which flash kernels never
materialise, so `attn_dropout > 0` switches training to an explicit softmax path.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from gptjax.errors import UserError
from gptjax.layers import Projection, quantize


def resolve_implementation(requested: str, dtype) -> str:
  """'auto' -> cuDNN flash attention on GPU with 16-bit compute, else XLA."""
  on_gpu = jax.default_backend() == "gpu"
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  if requested == "auto":
    return "cudnn" if on_gpu and half else "xla"
  if requested == "cudnn" and not (on_gpu and half):
    raise UserError(
      "model.attention='cudnn' needs an NVIDIA GPU and bfloat16/float16 compute "
      f"(backend {jax.default_backend()}, dtype {jnp.dtype(dtype).name}); use "
      "--config.model.attention=auto or xla"
    )
  return requested


def apply_rope(x_BxTxNxH: jax.Array, positions_BxT: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, rotate-half layout (GPT-NeoX/Llama); computed in float32."""
  half = x_BxTxNxH.shape[-1] // 2
  freq_1x1xh = (1.0 / theta ** (jnp.arange(half, dtype=jnp.float32) / half))[None, None, :]
  angle_BxTx1xh = (positions_BxT[..., None].astype(jnp.float32) * freq_1x1xh)[:, :, None, :]
  sin, cos = jnp.sin(angle_BxTx1xh), jnp.cos(angle_BxTx1xh)
  x1, x2 = jnp.split(x_BxTxNxH.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxNxH.dtype)


def segment_mask(segments_BxT):
  """(B, 1, T, S) bool: query t may see key s of its own segment (packed rows)."""
  return (segments_BxT[:, :, None] == segments_BxT[:, None, :])[:, None, :, :]


def _explicit_attention(q, k, v, dropout, deterministic, mask_Bx1xTxS=None):
  """Softmax attention with probability dropout; (B, T, N, H) in and out."""
  scale = q.shape[-1] ** -0.5
  logits_BxNxTxS = jnp.einsum("btnh,bsnh->bnts", q, k).astype(jnp.float32) * scale
  t = q.shape[1]
  allowed = jnp.tril(jnp.ones((t, t), bool))[None, None]
  if mask_Bx1xTxS is not None:
    allowed = allowed & mask_Bx1xTxS
  logits_BxNxTxS = jnp.where(allowed, logits_BxNxTxS, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits_BxNxTxS, axis=-1).astype(v.dtype)
  probs = dropout(probs, deterministic=deterministic)
  return jnp.einsum("bnts,bsnh->btnh", probs, v)


class CausalSelfAttention(nn.Module):
  """x (B, T, D) -> (B, T, D). Kernels carry logical axes (embed, heads, kv)."""

  cfg: "gptjax.model.GPTConfig"  # noqa: F821

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, deterministic: bool, start_B=None, segments_BxT=None):
    """start_B given: decoding with the KV cache, rows left-padded to start at start_B.
    segments_BxT given: packed rows, attention within each segment (XLA's path: cuDNN's
    fused kernel takes no arbitrary mask)."""
    cfg = self.cfg
    head_dim = cfg.d_model // cfg.n_head
    qkv = functools.partial(
      Projection,
      cfg,
      (cfg.d_model, cfg.n_head, head_dim),
      ("embed", "heads", "kv"),
      1,
      nn.initializers.normal(cfg.init_std),
    )
    q_BxTxNxH = qkv(name="query")(x_BxTxD)
    k_BxTxNxH = qkv(name="key")(x_BxTxD)
    v_BxTxNxH = qkv(name="value")(x_BxTxD)
    if cfg.positions == "rope":
      q_BxTxNxH = apply_rope(q_BxTxNxH, positions_BxT, cfg.rope_theta)
      k_BxTxNxH = apply_rope(k_BxTxNxH, positions_BxT, cfg.rope_theta)
    axes = ("batch", "length", "heads", "kv")
    q_BxTxNxH = nn.with_logical_constraint(q_BxTxNxH, axes)
    k_BxTxNxH = nn.with_logical_constraint(k_BxTxNxH, axes)
    v_BxTxNxH = nn.with_logical_constraint(v_BxTxNxH, axes)

    mask = None if segments_BxT is None else segment_mask(segments_BxT)
    if start_B is not None:
      out_BxTxNxH = self._cached(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, start_B)
    elif cfg.attn_dropout > 0 and not deterministic:
      out_BxTxNxH = _explicit_attention(
        q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, nn.Dropout(cfg.attn_dropout), deterministic, mask
      )
    elif mask is not None:
      out_BxTxNxH = jax.nn.dot_product_attention(
        q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, mask=mask, is_causal=True, implementation="xla"
      )
    else:
      out_BxTxNxH = jax.nn.dot_product_attention(
        q_BxTxNxH,
        k_BxTxNxH,
        v_BxTxNxH,
        is_causal=True,
        implementation=resolve_implementation(cfg.attention, cfg.dtype),
      )
    out_BxTxNxH = nn.with_logical_constraint(out_BxTxNxH, axes)
    # GPT-2: residual projections start smaller, std / sqrt(2 * n_layer).
    out_init = nn.initializers.normal(cfg.init_std / (2 * cfg.n_layer) ** 0.5)
    return Projection(
      cfg, (cfg.n_head, head_dim, cfg.d_model), ("heads", "kv", "embed"), 2, out_init, name="out"
    )(out_BxTxNxH)

  def _cached(self, q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, start_B):
    """Writes k, v at the cache's next T slots and attends over every valid slot.

    The cache ("cache" collection) is (B, N, S, H) with one shared write index: prompts are
    left-padded, so row b's tokens occupy slots start_B[b]..index. Heads before slots keeps
    both attention matmuls batched over leading (B, N) dims, so no step transposes the whole
    cache (with (B, S, N, H) that copy was half the step time at batch 32 on CPU). It is
    created by `init` with a (B, S) input, which only sets its shape.
    """
    b, t, n, h = q_BxTxNxH.shape
    int8 = self.cfg.kv_quant == "int8"  # int8 values, one float scale per token and head
    ready = self.has_variable("cache", "cached_key")
    dtype = jnp.int8 if int8 else k_BxTxNxH.dtype
    key = self.variable("cache", "cached_key", jnp.zeros, (b, n, t, h), dtype)
    value = self.variable("cache", "cached_value", jnp.zeros, (b, n, t, h), dtype)
    scales = None
    if int8:
      scale = lambda name: self.variable("cache", name, jnp.ones, (b, n, t), jnp.float32)
      scales = (scale("cached_key_scale"), scale("cached_value_scale"))
    index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
    if not ready:
      return jax.nn.dot_product_attention(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, is_causal=True)
    i = index.value
    # Under a mesh the cache splits like the activations: batch over data, heads over tensor.
    cache_axes = ("batch", "heads", "length", "kv")
    if i.ndim == 1:  # one write index per row: the serving engine's slots (engine.py)
      return _row_cached(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, key, value, scales, index, cache_axes)
    if t == 1:  # a decoding step
      return _step_cached(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, key, value, scales, index, start_B)
    for j, (var, new_BxTxNxH) in enumerate(((key, k_BxTxNxH), (value, v_BxTxNxH))):
      new_BxNxTxH = new_BxTxNxH.transpose(0, 2, 1, 3)
      if int8:
        new_BxNxTxH, scale_BxNxT = quantize(new_BxNxTxH, (3,))
        scales[j].value = nn.with_logical_constraint(
          jax.lax.dynamic_update_slice(scales[j].value, scale_BxNxT, (0, 0, i)), cache_axes[:3]
        )
      var.value = nn.with_logical_constraint(
        jax.lax.dynamic_update_slice(var.value, new_BxNxTxH, (0, 0, i, 0)), cache_axes
      )
    index.value = i + t
    slot_S = jnp.arange(key.value.shape[2])
    query_T = i + jnp.arange(t)
    mask_Bx1xTxS = (slot_S[None, None, None, :] <= query_T[None, None, :, None]) & (
      slot_S[None, None, None, :] >= start_B[:, None, None, None]
    )
    key_scales, value_scales = ((scales[0].value,), (scales[1].value,)) if int8 else (None, None)
    return _attend(q_BxTxNxH, (key.value,), (value.value,), key_scales, value_scales, mask_Bx1xTxS)


def _entries(k_Bx1xNxH, v_Bx1xNxH, int8: bool):
  """One token's keys and values as a cache holds them: (k, v) each (B, N, 1, H), and with
  an int8 cache their (B, N, 1) scales after them: (k, v, k_scale, v_scale)."""
  news = []
  for new_Bx1xNxH in (k_Bx1xNxH, v_Bx1xNxH):
    new_BxNx1xH = new_Bx1xNxH.transpose(0, 2, 1, 3)
    news.append(quantize(new_BxNx1xH, (3,)) if int8 else (new_BxNx1xH,))
  return tuple(x for part in zip(*news) for x in part)


def _after(entries, out_Bx1xNxH):
  """entries, computable only once out is: the cache writes wait for attention's reads.

  XLA's CPU backend orders work by data alone (it drops an optimization barrier); a write
  that could run before a read of the same cache made it copy every cache twice a step
  (BUILD_NOTES.md, "Decoding"). Each (row, head) entry depends on its own output, so the
  select stays local under a mesh, never fires unless that output is NaN (then that entry
  is zero), and is not folded away."""
  nan_BxNx1 = jnp.isnan(out_Bx1xNxH[..., 0]).transpose(0, 2, 1)
  keep = lambda e: jnp.where(nan_BxNx1.reshape(nan_BxNx1.shape + (1,) * (e.ndim - 3)), 0, e)
  return tuple(keep(e) for e in entries)  # a weak-typed 0 keeps int8 int8


def _step_cached(q_Bx1xNxH, k_Bx1xNxH, v_Bx1xNxH, key, value, scales, index, start_B):
  """One token per row at the shared slot i: attends over the cache as it was (slots
  start_B..i-1) plus the new entry as a second segment, then writes the entry at slot i,
  in place."""
  i = index.value
  entries = _entries(k_Bx1xNxH, v_Bx1xNxH, scales is not None)
  slot_S = jnp.arange(key.value.shape[2])
  old_Bx1x1xS = ((slot_S[None, :] < i) & (slot_S[None, :] >= start_B[:, None]))[:, None, None, :]
  mask_Bx1x1xS = jnp.concatenate([old_Bx1x1xS, jnp.ones_like(old_Bx1x1xS[..., :1])], axis=-1)
  key_scales = value_scales = None
  if scales is not None:
    key_scales, value_scales = (scales[0].value, entries[2]), (scales[1].value, entries[3])
  keys, values = (key.value, entries[0]), (value.value, entries[1])
  out_Bx1xNxH = _attend(q_Bx1xNxH, keys, values, key_scales, value_scales, mask_Bx1x1xS)
  axes = ("batch", "heads", "length", "kv")
  variables = (key, value) if scales is None else (key, value, *scales)
  for var, entry in zip(variables, _after(entries, out_Bx1xNxH)):
    at = (0, 0, i, 0)[: entry.ndim]
    new = jax.lax.dynamic_update_slice(var.value, entry.astype(var.value.dtype), at)
    var.value = nn.with_logical_constraint(new, axes[: entry.ndim])
  index.value = i + 1
  return out_Bx1xNxH


def _attend(q_BxTxNxH, keys, values, key_scales, value_scales, mask_Bx1xTxS):
  """Attention over a cache held as segments along S, each (B, N, S_i, H) (int8 with
  (B, N, S_i) scales, or float with None): each segment's scores are computed in place and
  only the small (B, N, T, S) scores are joined for the softmax. The keys' scales multiply
  the scores and the values' the probabilities, so no float copy of the cache is made."""
  dtype, h = q_BxTxNxH.dtype, q_BxTxNxH.shape[-1]
  q_BxTxNxH = q_BxTxNxH * h**-0.5
  parts = []
  for j, k in enumerate(keys):
    # keys first: with the cache as the left operand XLA's CPU dot reads it as stored;
    # the other way round it transposed each (B, N, S, H) cache every step
    part_BxNxSxT = jax.lax.dot_general(
      k.astype(dtype),
      q_BxTxNxH.transpose(0, 2, 3, 1),
      (((3,), (2,)), ((0, 1), (0, 1))),
      preferred_element_type=jnp.float32,
    )
    part = part_BxNxSxT.transpose(0, 1, 3, 2)
    parts.append(part if key_scales is None else part * key_scales[j][:, :, None, :])
  logits_BxNxTxS = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)
  # A padding query sees no key: its row is all `min`, softmax stays finite (and unused).
  logits_BxNxTxS = jnp.where(mask_Bx1xTxS, logits_BxNxTxS, jnp.finfo(jnp.float32).min)
  probs_BxNxTxS = jax.nn.softmax(logits_BxNxTxS, axis=-1)
  out, start = None, 0
  for j, v in enumerate(values):
    p = probs_BxNxTxS[..., start : start + v.shape[2]]
    p = p if value_scales is None else p * value_scales[j][:, :, None, :]
    part = jnp.einsum("bnts,bnsh->btnh", p.astype(dtype), v.astype(dtype))
    out, start = part if out is None else out + part, start + v.shape[2]
  return out


def _row_cached(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, key, value, scales, index, cache_axes):
  """One new token per row, row b's at its own slot index[b], attending to its slots
  0..index[b]: rows of a continuous batch start and end at different times.

  The cache may be a tuple of segments along S (the engine's: a call reads only the first
  few, so a short batch never copies or reads the long tail)."""
  b, t, n, h = q_BxTxNxH.shape
  assert t == 1, "a per-row cache index takes one token per row and call"
  split = isinstance(key.value, tuple)
  segments = lambda x: x if split else (x,)
  i_B, rows_B = index.value, jnp.arange(b)
  sizes = [k.shape[2] for k in segments(key.value)]
  starts = [sum(sizes[:j]) for j in range(len(sizes))]

  def write(var, new):  # new: (B, N, H) entries or (B, N) scales, one slot per row
    def put(seg, start, size):
      # a scatter of B slots (in place when the cache is donated); rows writing elsewhere
      # point past the segment's end and are dropped
      local_B = i_B - start
      local_B = jnp.where((local_B >= 0) & (local_B < size), local_B, size)
      seg = seg.at[rows_B, :, local_B].set(new.astype(seg.dtype), mode="drop")
      return nn.with_logical_constraint(seg, cache_axes[: seg.ndim])

    out = tuple(put(x, s, z) for x, s, z in zip(segments(var.value), starts, sizes))
    var.value = out if split else out[0]

  for j, (var, new_BxNxH) in enumerate(((key, k_BxTxNxH[:, 0]), (value, v_BxTxNxH[:, 0]))):
    if scales is not None:
      new_BxNxH, scale_BxN = quantize(new_BxNxH, (2,))
      write(scales[j], scale_BxN)
    write(var, new_BxNxH)
  index.value = i_B + 1
  mask_Bx1x1xS = jnp.arange(sum(sizes))[None, None, None, :] <= i_B[:, None, None, None]
  key_scales, value_scales = (None, None)
  if scales is not None:
    key_scales, value_scales = segments(scales[0].value), segments(scales[1].value)
  keys, values = segments(key.value), segments(value.value)
  return _attend(q_BxTxNxH, keys, values, key_scales, value_scales, mask_Bx1x1xS)

"""The model's parameterised primitives, in float or int8 (config.model.quant):

  Projection  x @ kernel (+ bias) over any input/output dims; int8: the kernel is int8 with
              one float32 scale per output channel, applied to the product (x @ (q * s) =
              (x @ q) * s), so no float copy of a kernel is a parameter
  Embed       a (V, D) table; int8: one scale per row, serving the lookup (rows times their
              scales) and the tied output head (logits times a scale per vocabulary entry)

Parameter names are flax's (kernel, bias, embedding), so float checkpoints are unchanged;
an int8 param `name` keeps its scale beside it as `name_scale`.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from gptjax import int8_kernel

SCALE = "_scale"


def quantize(w, axes: tuple[int, ...]):
  """w -> (int8 q, float32 scale), scale = max|w| / 127 over `axes` (the scale keeps the
  other dims): |w - q * scale| <= scale / 2 element-wise."""
  w = jnp.asarray(w, jnp.float32)
  amax = jnp.max(jnp.abs(w), axis=axes, keepdims=True)
  scale = jnp.where(amax > 0, amax / 127.0, 1.0)
  q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
  return q, jnp.squeeze(scale, axis=axes)


def dequantize(q, scale, axes: tuple[int, ...]):
  return q.astype(jnp.float32) * jnp.expand_dims(scale, axes)


class Projection(nn.Module):
  """nn.DenseGeneral's job for any kernel shape: (in dims..., out dims...).

  Flax's DenseGeneral initialises a flattened 2-D kernel and reshapes it, which clashes with
  3-D logical names under a mesh (its shape check applies the constraint to the flat value).
  This creates the kernel in its final shape; values and numerics are the same (and a 2-D
  one is nn.Dense's).
  """

  cfg: "gptjax.model.GPTConfig"  # noqa: F821
  kernel_shape: tuple  # (in dims..., out dims...)
  kernel_axes: tuple  # logical names of kernel_shape
  n_in: int  # how many trailing input dims the leading kernel dims contract with
  kernel_init: nn.initializers.Initializer

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    out_shape, out_axes = self.kernel_shape[self.n_in :], self.kernel_axes[self.n_in :]
    int8 = cfg.quant == "int8"
    kernel = self.param(
      "kernel",
      nn.with_logical_partitioning(
        nn.initializers.zeros if int8 else self.kernel_init, self.kernel_axes
      ),
      self.kernel_shape,
      jnp.int8 if int8 else cfg.param_dtype,
    )
    scale = _scale(self, "kernel", out_shape, out_axes) if int8 else None
    bias = (
      self.param(
        "bias",
        nn.with_logical_partitioning(nn.initializers.zeros, out_axes),
        out_shape,
        cfg.param_dtype,
      )
      if cfg.bias
      else None
    )
    x, bias = promote_dtype(x, bias, dtype=cfg.dtype)
    if scale is not None:  # int8: the product is one fused call on a CPU (int8_kernel.py)
      y = int8_kernel.matmul(x, kernel, scale, "kn", self.n_in, cfg.dtype)
    else:
      contract = (tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in)))
      y = jax.lax.dot_general(x, kernel.astype(cfg.dtype), (contract, ((), ())))
    lead = lambda v: v.reshape((1,) * (y.ndim - v.ndim) + v.shape)  # explicit leading dims
    return y if bias is None else y + lead(bias)


class Embed(nn.Module):
  """A (num, d_model) table: `lookup(ids)` rows, `table()` (table, per-row scale or None)."""

  cfg: "gptjax.model.GPTConfig"  # noqa: F821
  num: int
  axes: tuple  # the table's logical names

  def setup(self):
    cfg = self.cfg
    shape = (self.num, cfg.d_model)
    if cfg.quant == "int8":
      init = nn.with_logical_partitioning(nn.initializers.zeros, self.axes)
      self.embedding = self.param("embedding", init, shape, jnp.int8)
      self.scale = _scale(self, "embedding", shape[:1], self.axes[:1])
    else:
      init = nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), self.axes)
      self.embedding = self.param("embedding", init, shape, cfg.param_dtype)
      self.scale = None

  def table(self):
    return self.embedding, self.scale

  def lookup(self, ids_BxT, gather_axes):
    """Rows for ids, read from the table with its embed dimension whole (gather_axes).

    Gathering from an fsdp-split table straight into batch-split activations is a
    resharding XLA's partitioner can only do by replicating everything; all-gathering the
    table first is what FSDP does for every other weight anyway."""
    dtype = self.cfg.dtype
    table_VxD = nn.with_logical_constraint(self.embedding.astype(dtype), gather_axes)
    rows_BxTxD = jnp.take(table_VxD, ids_BxT, axis=0)
    if self.scale is None:
      return rows_BxTxD
    return rows_BxTxD * jnp.take(self.scale, ids_BxT, axis=0)[..., None].astype(dtype)


def _scale(module: nn.Module, name: str, shape: tuple, axes: tuple):
  init = nn.with_logical_partitioning(nn.initializers.ones, axes)
  return module.param(name + SCALE, init, shape, jnp.float32)

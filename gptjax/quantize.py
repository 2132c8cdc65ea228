"""int8 inference: symmetric int8 weights and KV cache, with float scales.

  weights    every projection kernel: one scale per output channel (the kernel's
             non-contracted dims), applied to the matmul's product, so x @ (q * s) is
             computed as (x @ q) * s; the embedding tables: one scale per row, which serves
             both the lookup (rows * their scales) and the tied output head (a scale per
             vocabulary column of the logits)
  KV cache   one scale per (token, head) over the head dim; attention applies the keys'
             scales to the scores and the values' to the probabilities

Written by hand rather than with Qwix (BUILD_NOTES.md, "int8 inference"): Qwix quantizes only the
projections (the tied embedding/head, 31% of GPT-2 small, stays float), mis-scales scanned
layers, and works by swapping jnp/lax functions globally while the model runs.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np

from gptjax import config as config_lib
from gptjax.errors import UserError
from gptjax.layers import SCALE, quantize
from gptjax.model import STACKED

MODES = config_lib.CHOICES["model.quant"]  # and model.kv_quant's


@dataclasses.dataclass(frozen=True)
class Quant:
  """What inference quantizes as it loads: weights (--quantize) and the KV cache (--kv_quant)."""

  weights: str = "none"
  kv: str = "none"

  def check(self) -> None:
    for flag, mode in (("quantize", self.weights), ("kv_quant", self.kv)):
      if mode not in MODES:
        raise UserError(f"--{flag}={mode} is not a mode; use one of {', '.join(MODES)}")


def _contracted(path: tuple[str, ...], name: str, ndim: int) -> tuple[int, ...] | None:
  """The dims a param's scale is taken over, or None for a param kept in float."""
  lead = 1 if STACKED in path else 0  # scanned layers: a leading "layers" dim
  if name == "embedding":  # (V, D) tables: per row
    return (ndim - 1,)
  if name != "kernel":  # biases, norms
    return None
  n_in = 2 if path[-1] == "out" else 1  # attention's out kernel is (N, H, D)
  return tuple(range(lead, lead + n_in))


def quantize_params(params) -> dict:
  """A float param tree (GPT's, either layer layout) -> the int8 model's tree: each kernel
  and embedding table int8, with its scale beside it as `<name>_scale`."""

  def walk(node, path):
    out = {}
    for key, value in node.items():
      if isinstance(value, dict):
        out[key] = walk(value, (*path, key))
        continue
      axes = _contracted(path, key, np.ndim(value))
      if axes is None:
        out[key] = value
      elif jnp.dtype(value.dtype) == jnp.int8:
        raise UserError("these weights are already int8; drop --quantize=int8")
      else:
        out[key], out[key + SCALE] = quantize(value, axes)
    return out

  return walk(params, ())

"""The serving engine's state as a pytree: the model's KV cache with one write index per row
(cache_index ([L,] B)) and cached_key/value held as a tuple of segments along the slots'
axis, beside per-row arrays. These walk it by name and find each array's batch axis."""

import jax
import jax.numpy as jnp


def name_of(path) -> str:
  """The innermost field or dict key on a pytree path (past a segment's tuple index)."""
  for k in reversed(path):
    name = getattr(k, "name", getattr(k, "key", None))
    if isinstance(name, str):
      return name
  return ""


def map_leaves(tree, fn):
  """Maps fn(name, leaf) over the cache's leaves (names: cached_key, cached_value, cache_index)."""
  return jax.tree_util.tree_map_with_path(lambda p, x: fn(name_of(p), x), tree)


def is_segments(x) -> bool:
  return isinstance(x, tuple)


def with_segments(cache, fn):
  """Maps fn over each cached_key/value's tuple of segments; cache_index stays as it is."""
  return jax.tree.map(lambda x: fn(x) if is_segments(x) else x, cache, is_leaf=is_segments)


def length_axis(name: str, ndim: int) -> int:
  """The slots' axis of a cache entry: ([L,] B, N, S, H) keys and values, ([L,] B, N, S)
  their int8 scales; the batch axis is two before it."""
  return ndim - 1 if name.endswith("_scale") else ndim - 2


def map_rows(st, fn, other=None):
  """Maps fn(x, batch axis) (or fn(other's x, axis, x)) over every per-row array of st."""

  def axis(path, x):
    name = name_of(path)
    if name == "cache_index":
      return x.ndim - 1  # ([L,] B)
    return length_axis(name, x.ndim) - 2 if name.startswith("cached_") else 0

  if other is None:
    return jax.tree_util.tree_map_with_path(lambda p, x: fn(x, axis(p, x)), st)
  return jax.tree_util.tree_map_with_path(lambda p, x, o: fn(o, axis(p, x), x), st, other)


def write_slots(cache, b: int):
  """Each row's next write slot (B,): every layer's index moves together."""
  index = next(
    x for p, x in jax.tree_util.tree_leaves_with_path(cache) if name_of(p) == "cache_index"
  )
  return jnp.reshape(index, (-1, b))[0]

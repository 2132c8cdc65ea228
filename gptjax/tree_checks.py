"""Facts about a state tree that training and checkpoints check: finite, its bytes, and an
exact checksum of its bits (orbax keeps none, so a flipped bit would restore silently)."""

import jax
import jax.numpy as jnp
import numpy as np


def all_finite(tree) -> jax.Array:
  """True when every float leaf of `tree` is finite (one fused reduction when jitted)."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves])) if leaves else jnp.array(True)


def is_finite(tree) -> bool:
  """all_finite of a (possibly sharded, multi-host) tree, the same answer on every host."""
  return bool(jax.jit(all_finite, out_shardings=_replicated(tree))(tree))


def checksum(tree) -> int:
  """Every array's bits summed as uint32, wrapping: exact in any order and on any mesh (the
  same on every host, before a save and after a restore onto other devices), and changed by
  any one flipped bit."""
  return int(jax.jit(_bits_sum, out_shardings=_replicated(tree))(tree))


def _bits_sum(tree) -> jax.Array:
  total = jnp.zeros((), jnp.uint32)
  for x in jax.tree.leaves(tree):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
      x = x.astype(jnp.uint8)
    bits = jax.lax.bitcast_convert_type(
      x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    )
    total += jnp.sum(bits.astype(jnp.uint32), dtype=jnp.uint32)
  return total


def _replicated(tree):
  sharding = jax.tree.leaves(tree)[0].sharding
  if isinstance(sharding, jax.sharding.NamedSharding):
    sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
  return sharding


def tree_bytes(tree) -> int:
  """Bytes of every array of `tree` (global sizes: what a checkpoint of it holds)."""
  return sum(
    int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
    for x in jax.tree.leaves(tree)
    if hasattr(x, "shape")
  )

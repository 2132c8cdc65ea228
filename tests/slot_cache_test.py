"""The engine's state pytree: names past segment tuples, and each array's batch axis."""

import jax.numpy as jnp

from gptjax import slot_cache


def test_map_rows_finds_each_arrays_batch_axis_through_segments():
  b = 3
  state = {
    "cache": {
      "h_0": {
        "attn": {
          "cached_key": (jnp.zeros((b, 2, 4, 5)), jnp.zeros((b, 2, 8, 5))),
          "cache_index": jnp.zeros((b,), jnp.int32),
        }
      }
    },
    "done_B": jnp.zeros((b,), bool),
  }
  axes = []
  slot_cache.map_rows(state, lambda x, axis: axes.append((x.shape, axis)) or x)
  assert sorted(axes) == sorted([((b, 2, 4, 5), 0), ((b, 2, 8, 5), 0), ((b,), 0), ((b,), 0)])
  first = slot_cache.with_segments(state["cache"], lambda x: x[:1])
  assert len(first["h_0"]["attn"]["cached_key"]) == 1
  assert slot_cache.write_slots(state["cache"], b).shape == (b,)
  stacked = {"cached_value": (jnp.zeros((4, b, 2, 8, 5)),), "cache_index": jnp.zeros((4, b))}
  seen = []
  slot_cache.map_rows(stacked, lambda x, axis: seen.append(axis) or x)
  assert seen == [1, 1]  # scanned layers: ([L,] B, ...)

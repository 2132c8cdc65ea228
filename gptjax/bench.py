"""Benchmarks (figures, not tests): `python -m gptjax.bench WHAT --config=... [--config.k=v]`.

  checkpoint  save (blocking part and total) and restore time, and size on disk, of the full
              train state (params + Adam) of the configured model; random weights and
              random (not zero) Adam moments, as after training.

Each prints one JSON line. The vocabulary is config.model.vocab_size (default 50257, GPT-2's),
so no dataset is read.
"""

import json
import os
import sys
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags

from gptjax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Scratch directory (default: a temporary one).")


def _trained_looking(state, shardings):
  """Adam's moments start at zero, which compresses to nothing: fill them with noise so the
  size and write time are those of a state after training."""
  import jax
  import jax.numpy as jnp

  def fill(opt_state):
    leaves, treedef = jax.tree.flatten(opt_state)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    return treedef.unflatten([
        jax.random.normal(k, x.shape, x.dtype) * 1e-3 if x.ndim else x
        for k, x in zip(keys, leaves)])
  return jax.jit(lambda st: st.replace(opt_state=fill(st.opt_state)),
                 out_shardings=shardings, donate_argnums=0)(state)


def bench_checkpoint(config, workdir: str) -> dict:
  import jax
  from gptjax import checkpoint, sharding, train
  mesh = sharding.make_mesh(config.mesh)
  s = train.setup(config, config.model.vocab_size or 50257, mesh, compile=False)
  state = jax.block_until_ready(_trained_looking(s.init(config.seed), s.state_shardings))
  ckpt = checkpoint.Checkpoints(workdir, config.checkpoint)
  t0 = time.perf_counter()
  ckpt.save(state, {"step": 0})
  blocking = time.perf_counter() - t0
  ckpt.wait()
  total = time.perf_counter() - t0
  size = checkpoint.directory_bytes(os.path.join(workdir, checkpoint.CHECKPOINTS, "0"))
  t0 = time.perf_counter()
  restored, _ = checkpoint.Checkpoints(workdir).restore(s.abstract, s.state_shardings)
  jax.block_until_ready(restored)
  restore = time.perf_counter() - t0
  ckpt.close()
  n = sum(x.size for x in jax.tree.leaves(state.params))
  return {"bench": "checkpoint", "n_params": int(n), "devices": jax.device_count(),
          "mesh": dict(mesh.shape), "async": bool(config.checkpoint.async_save),
          "save_blocking_s": round(blocking, 3), "save_total_s": round(total, 3),
          "restore_s": round(restore, 3), "bytes": size, "gib": round(size / 2**30, 3),
          "write_gib_per_s": round(size / 2**30 / total, 3)}


def main(argv):
  benches = {"checkpoint": bench_checkpoint}
  if len(argv) != 2 or argv[1] not in benches:
    print(f"gptjax.bench: error: name one benchmark: {', '.join(benches)}", file=sys.stderr)
    sys.exit(1)
  if _CONFIG.value is None:
    print("gptjax.bench: error: --config is required", file=sys.stderr)
    sys.exit(1)
  try:
    with tempfile.TemporaryDirectory() as tmp:
      print(json.dumps(benches[argv[1]](_CONFIG.value, _WORKDIR.value or tmp)))
  except UserError as e:
    print(f"gptjax.bench: error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)

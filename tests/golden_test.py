"""Golden values: the first steps of the `tiny` experiment, pinned to numbers.

Every other test compares gptjax with itself (cached vs recomputed, fused vs plain, one mesh
vs another), so a change that shifts the loss, the optimizer or the initialisation the same
way everywhere passes them all. These literals do not move with the code: a change that
alters them fails here and, if intended, is recorded by pasting the new numbers (run this
file with GOLDEN_PRINT=1 to print them).

Three steps on three fixed batches, as the first steps of AdamW hide a lot: the warmup
starts at lr 0 (step 1 moves nothing), and a first Adam update is g / sqrt(g^2) whatever b1
and b2 are; step 2's update is the first to depend on them, step 3's loss the first to see it.
"""

import os

import jax
import numpy as np
import optax
from conftest import tiny_config

from gptjax import sharding, train

VOCAB = 65  # tiny Shakespeare's characters
STEPS = 3
RTOL = 1e-5
GOLDEN = {  # float32 on CPU, one device
  "loss": [4.1826925, 4.1920114, 4.1759324],
  "grad_norm": [0.76312691, 0.64858842, 0.69794887],
  "param_norm": 12.996445,  # optax.tree_utils.tree_norm of the params after the last step
  # ... of each top-level module: weight decay shrinks a module's norm to first order (the
  # global norm is mostly the norms' unit scales, where a decayed embedding hides)
  "module_norm": {
    "h_0": 8.2110319,
    "h_1": 8.2150927,
    "ln_f": 5.6479731,
    "wpe": 0.68457532,
    "wte": 1.2769289,
  },
  "update_norm": 0.44467792,  # ... of the params' change since the init (the optimizer's)
  # ... of the kernels alone: weight decay's first-order mark (the norms above hide it)
  "kernel_norm": 2.6140904,
}


def _kernels(params) -> list:
  """The weight matrices (what weight decay shrinks), chosen by name here, not by optim.py."""
  leaves = jax.tree_util.tree_leaves_with_path(params)
  return [x for path, x in leaves if path[-1].key == "kernel"]


def _flat(tree, prefix=""):
  """{"loss[0]": 4.18, "module_norm/wte": 1.2, ...}: every golden number by name."""
  if isinstance(tree, dict):
    return {k: v for key in tree for k, v in _flat(tree[key], f"{prefix}/{key}").items()}
  if isinstance(tree, list):
    return {k: v for i, x in enumerate(tree) for k, v in _flat(x, f"{prefix}[{i}]").items()}
  return {prefix.lstrip("/"): float(tree)}


# In the fast tier on purpose (~3-6 s): the one check that no relative test can make.
def test_the_first_steps_of_tiny_match_the_golden_numbers():
  c = tiny_config()  # 2 x 2 x 32, block 32, batch 8, AdamW with warmup 2, no dropout
  c.mesh.shape.update(dict(data=1, fsdp=1, tensor=1))
  s = train.setup(c, VOCAB, sharding.make_mesh(c.mesh, jax.devices()[:1]))
  state = s.init(c.seed)
  init = jax.tree.map(np.asarray, state.params)  # a host copy: the step donates the state
  batches = np.random.default_rng(0).integers(0, VOCAB, (STEPS, *s.batch_shape), np.int32)
  got = {"loss": [], "grad_norm": []}
  for batch in batches:
    state, metrics = s.train_step(state, s.batch(batch))
    got["loss"].append(float(metrics["loss"]))
    got["grad_norm"].append(float(metrics["grad_norm"]))
  norm = optax.tree_utils.tree_norm
  got["param_norm"] = float(norm(state.params))
  got["module_norm"] = {k: float(norm(v)) for k, v in state.params.items()}
  got["update_norm"] = float(norm(jax.tree.map(np.subtract, state.params, init)))
  got["kernel_norm"] = float(norm(_kernels(state.params)))
  if os.environ.get("GOLDEN_PRINT"):
    print(repr(got))
  # RTOL: float32 noise is far below it (these numbers are bit-identical over device counts
  # and thread settings here); the smallest mutations tried (weight decay 0.1 -> 0.11, b2
  # 0.95 -> 0.96, init_std 0.02 -> 0.0201) still move a number by 2.5-40x RTOL.
  got, want = _flat(got), _flat(GOLDEN)
  assert got.keys() == want.keys()
  changed = {k: (got[k], want[k]) for k in want if not np.isclose(got[k], want[k], RTOL, 0)}
  assert not changed, f"golden numbers changed, (got, pinned): {changed}"

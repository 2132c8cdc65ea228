"""Ablations on the `:cpu` character-level Shakespeare model: norm, positions, activation.

  python -m gptjax.sweep --config=experiments/shakespeare_ablation.py --workdir=runs/abl
  python -m gptjax.report runs/abl

  (default)  one switch at a time against the GPT-2 baseline: 4 variants
  :product   every combination of the three switches: 8 variants

Each run is nanoGPT's CPU recipe (4 x 4 x 128, block 64, batch 12) cut to 300 steps, so
the 4-variant sweep takes a few minutes on a 2-core CPU.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))
import shakespeare_char  # noqa: E402

from gptjax.errors import UserError  # noqa: E402

AXES = {
  "model.norm": ["layernorm", "rmsnorm"],
  "model.positions": ["learned", "rope"],
  "model.activation": ["gelu", "swiglu"],
}


def get_config(variant: str = ""):
  if variant not in ("", "product"):
    raise UserError(f"unknown variant {variant!r} of shakespeare_ablation.py; use :product or none")
  c = shakespeare_char.get_config("cpu")
  c.train.num_steps = 300
  c.train.eval_every, c.train.eval_batches = 50, 20
  c.checkpoint.every = 100
  return c


def get_sweep(variant: str = ""):
  from gptjax.sweep import product

  if variant == "product":
    return product(AXES)
  return {
    "baseline": {},
    "rmsnorm": {"model.norm": "rmsnorm"},
    "rope": {"model.positions": "rope"},
    "swiglu": {"model.activation": "swiglu"},
  }

"""Character-level tiny Shakespeare, nanoGPT's shakespeare_char recipe.

  (default)  nanoGPT's GPU config: 6 layers x 6 heads x 384, block 256, batch 64, dropout 0.2.
  :cpu       nanoGPT's CPU command: 4 x 4 x 128, block 64, batch 12, no dropout, 2000 steps.

Data: TFDS tiny_shakespeare (train 1,003,854 / validation 55,770 characters). Offline, point
--config.data.manual_dir at a folder holding its input.txt.
"""

from gptjax.config import default_config
from gptjax.errors import UserError


def get_config(variant: str = "gpu"):
  c = default_config()
  c.data.source = "tfds"
  c.data.tfds_name = "tiny_shakespeare"
  c.data.tokenizer = "char"
  m, o, t = c.model, c.optim, c.train
  m.n_layer, m.n_head, m.d_model, m.block_size = 6, 6, 384, 256
  m.dropout = m.attn_dropout = 0.2
  m.bias = False  # nanoGPT's train.py default
  t.batch_size, t.num_steps = 64, 5000
  t.eval_every, t.eval_batches, t.log_every = 250, 200, 10
  o.lr, o.min_lr, o.warmup_steps = 1e-3, 1e-4, 100  # the cosine ends at train.num_steps
  o.b2 = 0.99  # small batches of tokens: a shorter second-moment memory
  if variant == "cpu":
    m.n_layer, m.n_head, m.d_model, m.block_size = 4, 4, 128, 64
    m.dropout = m.attn_dropout = 0.0
    t.batch_size, t.num_steps, t.eval_batches = 12, 2000, 20
  elif variant != "gpu":
    raise UserError(f"unknown variant {variant!r} of shakespeare_char.py; use :cpu or none")
  return c

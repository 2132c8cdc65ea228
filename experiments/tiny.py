"""A seconds-long model for tests and smoke runs: 2 layers x 2 heads x 32, block 32.

Data: local text; defaults to the shared tiny Shakespeare file beside the repository.
"""

import os

from gptjax.config import default_config

SHARED_TEXT = os.path.join(
  os.path.dirname(os.path.realpath(__file__)),
  "..",
  "..",
  "shared",
  "data",
  "tinyshakespeare",
  "input.txt",
)


def get_config():
  c = default_config()
  c.model.n_layer, c.model.n_head, c.model.d_model, c.model.block_size = 2, 2, 32, 32
  c.data.source = "text"
  c.data.path = os.path.normpath(SHARED_TEXT)
  c.data.tokenizer = "char"
  c.train.batch_size, c.train.num_steps = 8, 20
  c.train.log_every, c.train.eval_every, c.train.eval_batches = 5, 10, 2
  c.optim.lr, c.optim.min_lr, c.optim.warmup_steps = 3e-3, 3e-4, 2
  return c

"""Fine-tune the `shakespeare_char.py:cpu` model to reply as the next speaker.

First pretrain it (its own command, README), then:

  python -m gptjax.main --config=experiments/shakespeare_dialogue.py \
    --workdir=runs/dialogue --config.init_from=runs/shakespeare_cpu

Data: ../shared/data/shakespeare_dialogue/{train,validation}.jsonl, conversations of 2 or 4
consecutive speeches ("SPEAKER: speech"), the 2nd and 4th the assistant's. The "plain"
template renders each speech followed by a blank line; the assistant's speeches and their
blank lines are trained on. The model's shape, block size (64) and vocabulary come from
init_from: at 64 characters most conversations are longer than a row, so most rows hold the
last reply with the end of the speech before it, and a reply longer than a row its start.
"""

from gptjax.config import default_config

DATA = "../shared/data/shakespeare_dialogue"


def get_config():
  c = default_config()
  c.init_from = "runs/shakespeare_cpu"
  c.data.source = "task"
  c.data.path = f"{DATA}/train.jsonl"
  c.data.val_path = f"{DATA}/validation.jsonl"
  c.data.chat_template = "plain"
  c.data.tokenizer = "char"
  m, o, t = c.model, c.optim, c.train
  # The :cpu shape (taken from init_from anyway; set here so --mode=compile_only works alone).
  m.n_layer, m.n_head, m.d_model, m.block_size, m.bias = 4, 4, 128, 64, False
  t.batch_size, t.num_steps = 12, 600
  t.eval_every, t.eval_batches, t.log_every = 100, 1000, 20  # eval_batches: all 424 replies
  o.lr, o.min_lr, o.warmup_steps, o.b2 = 3e-4, 3e-5, 20, 0.99
  o.weight_decay = 0.0
  c.checkpoint.every = 200
  return c

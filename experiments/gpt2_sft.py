"""Supervised fine-tuning of a Hugging Face GPT-2 (:small, :medium, :large, :xl) on
conversations, with the "gpt2" chat template (turns "User: ..." / "Assistant: ...", each
ended by <|endoftext|>, GPT-2's own end-of-text token).

  python -m gptjax.main --config=experiments/gpt2_sft.py:small --workdir=runs/gpt2_sft \
    --config.init_from=hf:/models/gpt2 --config.data.path=train.jsonl \
    --config.data.val_path=validation.jsonl

init_from: a local GPT2LMHeadModel directory of that size (its tokenizer files, or tiktoken's
gpt2, give the vocabulary). Data: JSONL, {"messages": [...]} or {"prompt", "completion"}
records (defaults: the Shakespeare dialogue fixture beside the repository). Loss on the
assistant replies only; examples packed into 1024-token rows. The recipe follows common GPT-2
fine-tuning practice: a small constant-ish learning rate (3e-5 after 50 warmup steps, decayed
to 3e-6), no weight decay, 32 sequences of 1024 per update, dropout 0.1 as GPT-2 was trained.
"""

import importlib.util
import os

DATA = "../shared/data/shakespeare_dialogue"


def _gpt2():
  """experiments/gpt2.py (the shapes and the BPE tokenizer), loaded beside this file."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpt2.py")
  spec = importlib.util.spec_from_file_location("_gptjax_experiment_gpt2", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(size: str = "small"):
  c = _gpt2().get_config(size)
  c.model.dropout = 0.1
  c.data.source = "task"
  c.data.path, c.data.val_path = f"{DATA}/train.jsonl", f"{DATA}/validation.jsonl"
  c.data.chat_template = "gpt2"
  c.train.batch_size, c.optim.grad_accum = 32, 4
  c.train.num_steps = 1000
  c.train.eval_every, c.train.eval_batches, c.train.log_every = 100, 50, 10
  c.optim.lr, c.optim.min_lr, c.optim.warmup_steps = 3e-5, 3e-6, 50
  c.optim.weight_decay = 0.0
  c.checkpoint.every = 200
  return c

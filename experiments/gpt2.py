"""GPT-2 shapes (:small 124M, :medium 350M, :large 774M, :xl 1.5B) on a TFDS text dataset.

Data: TFDS `lm1b`, the One Billion Word benchmark (word-level English news sentences; text
feature "text", train/test splits only), tokenized with GPT-2's BPE (50,257 ids, padded to
50,304): tiktoken's gpt2 files, or offline --config.data.tokenizer_path=DIR holding GPT-2's
tokenizer.json or vocab.json + merges.txt (with --config.init_from=hf:DIR, DIR's own files).
Any TFDS text dataset works: --config.data.tfds_name=NAME --config.data.text_feature=FEATURE
--config.data.val_split=SPLIT.
Fine-tuning GPT-2: --config.init_from=hf:DIR (a local GPT2LMHeadModel of this size).
Optimizer and schedule follow nanoGPT's train_gpt2 (~0.5M tokens per update: 480 sequences of
1024 as 40 microbatches of 12; on N devices lower optim.grad_accum by N).
Large models on small chips: --config.model.scan_layers=true --config.model.remat=full
(:xl with fsdp=8: ~5.3 GiB per device instead of ~27 GiB, compiled in seconds).
"""

from gptjax.config import default_config
from gptjax.errors import UserError

SHAPES = {  # n_layer, n_head, d_model
  "small": (12, 12, 768),
  "medium": (24, 16, 1024),
  "large": (36, 20, 1280),
  "xl": (48, 25, 1600),
}


def get_config(size: str = "small"):
  if size not in SHAPES:
    raise UserError(f"unknown GPT-2 size {size!r}; use one of {', '.join(SHAPES)}")
  c = default_config()
  c.model.n_layer, c.model.n_head, c.model.d_model = SHAPES[size]
  c.model.block_size = 1024
  c.data.source = "tfds"
  c.data.tfds_name = "lm1b"
  c.data.val_split = "test"
  c.data.tokenizer = "bpe"
  c.train.batch_size = 480
  c.optim.grad_accum = 40
  c.train.num_steps = 600_000
  c.train.eval_every, c.train.eval_batches, c.train.log_every = 1000, 200, 10
  c.optim.lr, c.optim.min_lr, c.optim.warmup_steps = 6e-4, 6e-5, 2000
  return c

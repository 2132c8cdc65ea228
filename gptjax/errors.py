"""The one exception type for mistakes a user can make (flags, configs, files).

The programs (gptjax/cli.py) turn a UserError into one line and exit code 1; anything else is
a bug and keeps its traceback.
"""

import re

# The fix for a step that does not fit a device (metrics.check_fits before compiling, cli on an
# out-of-memory error while running).
OUT_OF_MEMORY_FIX = (
  "recompute activations per layer (--config.model.scan_layers=true "
  "--config.model.remat=full), raise --config.optim.grad_accum, shard over more devices "
  "(--config.mesh.shape.fsdp), or shorten --config.model.block_size"
)


def out_of_memory_fix(config=None) -> str:
  """OUT_OF_MEMORY_FIX, most effective first and without what `config` already does:
  scan_layers with full remat (GPT-2 xl on 8 devices: 27.4 -> 5.3 GiB per device), the
  chunked loss (no full logits), then more microbatches, devices or a shorter context."""
  if config is None:
    return OUT_OF_MEMORY_FIX
  fixes = []
  if not (config.model.scan_layers and config.model.remat == "full"):
    fixes.append(
      "recompute activations per layer (--config.model.scan_layers=true --config.model.remat=full)"
    )
  if not config.train.loss_chunk:
    fixes.append("compute the loss in chunks (--config.train.loss_chunk=256)")
  fixes.append(f"raise --config.optim.grad_accum (now {config.optim.grad_accum})")
  fixes.append("shard over more devices (--config.mesh.shape.fsdp)")
  return (
    ", ".join(fixes) + f", or shorten --config.model.block_size (now {config.model.block_size})"
  )


class UserError(Exception):
  """A bad input: the message names the bad value and how to fix it."""


def describe(e: BaseException) -> str:
  """An exception as a short readable reason: its first sentence of substance, without
  tensorstore's JSON specs or Python object reprs, cut at a word boundary."""
  text = " ".join(str(e).split())
  text = text.split(" [tensorstore_spec")[0]
  text = re.sub(r"<[^<>]*(object|method|function)[^<>]*>", "", text).strip(" :;,")
  if not text:
    return type(e).__name__
  if len(text) > 240:
    text = text[:240].rsplit(" ", 1)[0] + " ..."
  return text

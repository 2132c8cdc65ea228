"""--mode=sample: continuations of a prompt from a workdir's newest checkpoint (or export)."""

import os
import time

import jax

from gptjax import checkpoint, decode, tokenizers
from gptjax import config as config_lib
from gptjax.errors import UserError
from gptjax.model import GPT, GPTConfig, abstract_params


def load(workdir: str, config=None):
  """(model, params, tokenizer, where) from a run's newest checkpoint, else its export;
  or, given a config with init_from, from those weights and the config's tokenizer."""
  if config is not None and config.init_from:
    return _load_init_from(config)
  export_dir = os.path.join(workdir, checkpoint.EXPORT)
  has_export = os.path.isdir(os.path.join(export_dir, "params"))
  config_dir = workdir if os.path.exists(os.path.join(workdir, "config.json")) else export_dir
  if not os.path.exists(os.path.join(config_dir, "config.json")):
    raise UserError(
      f"{workdir} holds no training run (no config.json, checkpoints or export); "
      "pass the --workdir of a run, or --config=... with "
      "--config.init_from=hf:DIR"
    )
  config = checkpoint.workdir_config(config_dir)
  model = GPT(GPTConfig.from_config(config.model, config.model.vocab_size))
  target = abstract_params(config)
  one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  shardings = jax.tree.map(lambda _: one, target)
  restored = None
  if os.path.isdir(os.path.join(workdir, checkpoint.CHECKPOINTS)):
    restored = checkpoint.Checkpoints(workdir).restore_params(target, shardings, set_aside=False)
  if restored is not None:
    params, where = restored[0], f"checkpoint {restored[1]['step']}"
  elif has_export:
    params, where = checkpoint.load_export(export_dir, target, shardings), "export"
  else:
    raise UserError(
      f"{workdir} has no checkpoint and no export; train there first (or pass "
      "the --workdir of a trained run)"
    )
  tokenizer = tokenizers.load(os.path.join(config_dir, "tokenizer.json"))
  return model, params, tokenizer, where


def _load_init_from(config):
  from gptjax import data, hf

  config_lib.validate(config)
  hf.directory(config.init_from, config.model)
  if config.data.tokenizer == "char":
    raise UserError(
      "sampling from --config.init_from needs a tokenizer that does not train on "
      "the data: set --config.data.tokenizer=bpe (GPT-2's)"
    )
  tokenizer = tokenizers.build(config.data.tokenizer, data.tokenizer_path(config), None)
  model = GPT(GPTConfig.from_config(config.model, tokenizer.vocab_size))
  params = jax.device_put(hf.load_params(config.init_from, model.cfg), jax.local_devices()[0])
  return model, params, tokenizer, config.init_from


def sample(
  workdir: str,
  prompt: str,
  num_samples: int,
  max_new: int,
  temperature: float,
  top_k: int,
  top_p: float,
  seed: int,
  config=None,
) -> list[str]:
  model, params, tokenizer, where = load(workdir, config)
  sampling = decode.Sampling(temperature, top_k, top_p)
  sampling.check(model.cfg.vocab_size)
  if num_samples < 1 or max_new < 1:
    raise UserError("--num_samples and --max_new_tokens must be at least 1")
  try:
    ids = tokenizer.encode(prompt).tolist() if prompt else [tokenizer.eot_id]
  except tokenizers.UnknownCharacter as e:
    raise UserError(f"{e.problem}: this model cannot read it; remove it from --prompt") from None
  if len(ids) >= model.cfg.block_size:
    print(
      f"warning: the prompt has {len(ids)} tokens; the model sees only the last "
      f"{model.cfg.block_size - 1} (its context is {model.cfg.block_size})",
      flush=True,
    )
  decoder = decode.Decoder(model, params, stop_tokens=[tokenizer.eot_id])
  t0 = time.perf_counter()
  outs, reasons = decode.complete(decoder, [ids] * num_samples, max_new, sampling, seed)
  seconds = time.perf_counter() - t0
  texts = []
  for out in outs:
    texts.append(prompt + tokenizer.decode(out))
    print(texts[-1], flush=True)
    print("---------------", flush=True)
  n = sum(len(o) for o in outs)
  print(
    f"{n} tokens in {seconds:.2f}s ({n / seconds:.0f} tokens/s incl. compile) from "
    f"{where}; finish: {', '.join(reasons)}",
    flush=True,
  )
  return texts

"""One loader for everything that runs a trained model: sample, chat, export, the benches
(and, next, serving and quantization).

`load` gives the model, its parameters and its tokenizer from one of three sources:
  a run's workdir   its newest checkpoint that restores, else its export (WORKDIR/export)
  an export         WORKDIR/export alone (params + config.json + tokenizer.json)
  Hugging Face      a GPT-2 directory, through a config with init_from=hf:DIR
Parameters land on one device, or laid out over a mesh by the config's rules table.
"""

import dataclasses
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import orbax.checkpoint as ocp

from gptjax import (
  chat_template,
  checkpoint,
  data,
  decode,
  hf,
  quantize,
  sharding,
  storage,
  tokenizer,
)
from gptjax import config as config_lib
from gptjax import workdir as workdir_lib
from gptjax.errors import UserError
from gptjax.model import GPT, GPTConfig, abstract_params, per_layer, to_layout

EXPORT = "export"  # WORKDIR/export: params only, with config.json and tokenizer.json


@dataclasses.dataclass
class Loaded:
  """A model ready to run: `where` names the source ("checkpoint 30", "export", "hf:DIR")."""

  model: GPT
  params: Any
  tokenizer: tokenizer.Tokenizer
  where: str
  config: Any  # the run's config (ConfigDict, upgraded to today's keys)


def load(
  workdir: str,
  config=None,
  mesh: jax.sharding.Mesh | None = None,
  quant: quantize.Quant = quantize.Quant(),
) -> Loaded:
  """The newest checkpoint of the run in `workdir`, else its export; or, given a config with
  init_from, those weights with the config's tokenizer. mesh None: one device. quant: int8
  weights (converted here) and/or an int8 KV cache. workdir may be relative or start with ~
  (a script's argument; orbax refuses relative paths)."""
  loaded = _load(storage.absolute(workdir), config, mesh)
  return quantized(loaded, quant, mesh) if quant != quantize.Quant() else loaded


def quantized(loaded: Loaded, quant: quantize.Quant, mesh=None) -> Loaded:
  """loaded with int8 weights (quant.weights) and/or KV cache (quant.kv), laid out as the
  float params were (one device, or mesh)."""
  quant.check()
  cfg, config = loaded.model.cfg, loaded.config.copy_and_resolve_references()
  params, where = loaded.params, loaded.where
  if quant.weights == "int8":
    if cfg.quant == "int8":
      raise UserError(f"{where} already holds int8 weights; drop --quantize=int8")
    config.model.quant = "int8"
    shardings = param_layout(config, mesh)[1]
    params = jax.jit(quantize.quantize_params, out_shardings=shardings)(params)
    where += ", int8 weights"
  config.model.kv_quant = quant.kv
  where += ", int8 KV cache" if quant.kv == "int8" else ""
  model = GPT(dataclasses.replace(cfg, quant=config.model.quant, kv_quant=quant.kv))
  return dataclasses.replace(loaded, model=model, params=params, where=where, config=config)


def _load(workdir: str, config, mesh) -> Loaded:
  if config is not None:
    return _load_config(workdir, config, mesh)
  export_dir = storage.join(workdir, EXPORT)
  if storage.isdir(storage.join(workdir, "params")):  # an export directory itself
    export_dir = workdir
  config_dir = workdir if storage.exists(storage.join(workdir, "config.json")) else export_dir
  if not storage.exists(storage.join(config_dir, "config.json")):
    raise UserError(
      f"{workdir} holds no training run (no config.json, checkpoints or export); "
      "pass the --workdir of a run, or --config=... with "
      "--config.init_from=hf:DIR"
    )
  config = _saved_config(config_dir)
  target, shardings = param_layout(config, mesh)
  restored = None
  if storage.isdir(storage.join(workdir, checkpoint.CHECKPOINTS)):
    note = lambda message: print(message, file=sys.stderr, flush=True)  # stdout: results only
    restored = checkpoint.Checkpoints(workdir, warn=note, reader=True).restore_params(
      target, shardings, set_aside=False
    )
  if restored is not None:
    params, where = restored[0], f"checkpoint {restored[1]['step']}"
  elif storage.isdir(storage.join(export_dir, "params")):
    if export_dir != config_dir and storage.exists(storage.join(export_dir, "config.json")):
      config = _saved_config(export_dir)  # the export's own: int8 when it was written so
      target, shardings = param_layout(config, mesh)
    params, where = load_export(export_dir, target, shardings), "export"
  else:
    raise UserError(
      f"{workdir} has no checkpoint and no export; train there first (or pass "
      "the --workdir of a trained run)"
    )
  tok = tokenizer.load(storage.join(config_dir, "tokenizer.json"))
  model = GPT(GPTConfig.from_config(config.model, config.model.vocab_size))
  return Loaded(model, params, tok, where, config)


def _saved_config(directory: str):
  """A run's or export's config.json, with the chat template it trained on when it kept one."""
  config = config_lib.load_saved(directory)
  if storage.exists(storage.join(directory, chat_template.SAVED)):
    config.data.chat_template = storage.join(directory, chat_template.SAVED)
  return config


def param_layout(config, mesh: jax.sharding.Mesh | None):
  """(shapes and dtypes of the params, where each goes): all on the first local device, or
  split over `mesh` by config.mesh.rules (as training lays them out)."""
  boxed = abstract_params(config, boxed=True)
  abstract = nn.meta.unbox(boxed)
  if mesh is None:
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return abstract, jax.tree.map(lambda _: one, abstract)
  return abstract, sharding.tree_shardings(boxed, mesh, sharding.rules(config.mesh))


def _load_config(workdir: str, config, mesh) -> Loaded:
  """--config given to sample, chat or evaluate: the weights its init_from names (a trained
  workdir has its own config, and a --config beside it would be silently ignored)."""
  if any(
    storage.exists(storage.join(d, "config.json")) for d in (workdir, storage.join(workdir, EXPORT))
  ):
    raise UserError(
      f"--workdir={workdir} holds a trained run, which brings its own config; drop --config "
      "(with --config, the weights come from --config.init_from)"
    )
  if not config.init_from:
    raise UserError(
      "--config names no weights without --config.init_from=hf:DIR or a gptjax run; or "
      "pass the --workdir of a trained run without --config"
    )
  config = config.copy_and_resolve_references()  # its quant keys: made here, as --quantize's
  quant = quantize.Quant(config.model.quant, config.model.kv_quant)
  config.model.quant = config.model.kv_quant = "none"
  if is_hf(config.init_from):
    return quantized(_load_init_from(config, mesh), quant, mesh)
  # A shape key set otherwise than the run's weights is refused (an int8 export loads too).
  config_lib.adopt(config, config_lib.load_saved(workdir_lib.run_files(config.init_from)))
  return load(config.init_from, mesh=mesh, quant=quant)


def _load_init_from(config, mesh) -> Loaded:
  config_lib.validate(config)
  hf.directory(config.init_from, config.model)
  if config.data.tokenizer == "char":
    raise UserError(
      "sampling from --config.init_from needs a tokenizer that does not train on "
      "the data: set --config.data.tokenizer=bpe (GPT-2's)"
    )
  tok = tokenizer.build(config.data.tokenizer, data.tokenizer_path(config), None)
  model = GPT(GPTConfig.from_config(config.model, tok.vocab_size))
  resolved = config_lib.upgrade(config_lib.resolved(config, tok.vocab_size))
  params = jax.device_put(
    hf.load_params(config.init_from, model.cfg), param_layout(resolved, mesh)[1]
  )
  return Loaded(model, params, tok, config.init_from, resolved)


def is_hf(init_from) -> bool:
  return bool(init_from) and init_from.startswith("hf:")


def adopt_init_from(config) -> list[str]:
  """A run starting from a gptjax run takes its shape and vocabulary (config.adopt); returns
  what changed."""
  if not config.init_from or is_hf(config.init_from):
    return []
  source = config_lib.load_saved(workdir_lib.run_files(config.init_from))
  check_float(source.model.quant, f"config.init_from={config.init_from}", "start training")
  return config_lib.adopt(config, source)


def check_float(quant: str, what: str, to: str) -> None:
  """int8 weights cannot be trained on or written as Hugging Face's float GPT-2."""
  if quant == "int8":
    raise UserError(
      f"{what} holds int8 weights (an int8 export), which cannot {to}; use the float run "
      "or its float export (--mode=export without --quantize)"
    )


def init_from(source: str, cfg: GPTConfig):
  """(params as numpy or on one device, where they came from) to start a run of model cfg:
  hf:DIR, or a gptjax run's newest checkpoint, else its export, in cfg's layer layout."""
  if is_hf(source):
    return hf.load_params(source, cfg), source
  loaded = load(source)
  check_float(loaded.model.cfg.quant, source, "start training")
  return to_layout(per_layer(loaded.params, loaded.model.cfg), cfg), f"{source} ({loaded.where})"


def load_export(export_dir: str, abstract, shardings):
  """Params from an export directory, laid out by `shardings`."""
  path = storage.join(storage.absolute(export_dir), "params")
  if not storage.isdir(path):
    raise UserError(f"{export_dir} holds no exported params; run --mode=export first")
  return ocp.StandardCheckpointer().restore(path, checkpoint.with_shardings(abstract, shardings))


def sample_text(
  workdir: str,
  prompt: str,
  num_samples: int,
  max_new: int,
  sampling: decode.Sampling,
  seed: int,
  config=None,
  quant: quantize.Quant = quantize.Quant(),
) -> list[str]:
  """--mode=sample: prints num_samples continuations of `prompt` and returns them. stdout
  holds the samples alone, each followed by a separator line; notes and timing go to stderr."""
  run = load(workdir, config, quant=quant)
  model, tok = run.model, run.tokenizer
  sampling.check(model.cfg.vocab_size)
  if num_samples < 1 or max_new < 1:
    raise UserError("--num_samples and --max_new_tokens must be at least 1")
  try:
    ids = tok.encode(prompt).tolist() if prompt else [tok.eot_id]
  except tokenizer.UnknownCharacter as e:
    raise UserError(f"{e.problem}: this model cannot read it; remove it from --prompt") from None
  if len(ids) >= model.cfg.block_size:
    print(
      f"warning: the prompt has {len(ids)} tokens; the model sees only the last "
      f"{model.cfg.block_size - 1} (its context is {model.cfg.block_size})",
      file=sys.stderr,
      flush=True,
    )
  decoder = decode.Decoder(model, run.params, stop_tokens=[tok.eot_id])
  t0 = time.perf_counter()
  outs, reasons = decode.complete(decoder, [ids] * num_samples, max_new, sampling, seed)
  seconds = time.perf_counter() - t0
  texts = []
  for out in outs:
    texts.append(prompt + tok.decode(out))
    print(texts[-1], flush=True)
    print("---------------", flush=True)
  n = sum(len(o) for o in outs)
  print(
    f"{n} tokens in {seconds:.2f}s ({n / seconds:.0f} tokens/s incl. compile) from "
    f"{run.where}; finish: {', '.join(reasons)}",
    file=sys.stderr,
    flush=True,
  )
  return texts

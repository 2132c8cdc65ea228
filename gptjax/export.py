"""--mode=export: a run's newest parameters, without the optimizer state, for inference.

gptjax  WORKDIR/export: params (orbax) + config.json + tokenizer.json; inference.load reads it
hf      WORKDIR/export_hf: a GPT2LMHeadModel directory (hf.save) that transformers loads
"""

import json

import jax
import orbax.checkpoint as ocp

from gptjax import chat_template, checkpoint, hf, inference, quantize, storage
from gptjax import config as config_lib
from gptjax.errors import UserError
from gptjax.metrics import format_bytes
from gptjax.storage import ensure_writable_dir

MARKER = "export.json"  # {"step", "from"}: what makes a directory an export, and of which run


def export(
  workdir: str, out_dir: str | None = None, warn=print, weights: str = "none"
) -> tuple[str, dict]:
  """Writes the newest checkpoint's params with config and tokenizer; (out_dir, its meta).
  weights="int8": int8 params with their scales, and a config.json that says so.

  Restored onto one device: an export is for sampling, wherever the training ran.
  """
  quantize.Quant(weights).check()
  marker = storage.join(workdir, MARKER)
  if storage.exists(marker):
    source = storage.read_json(marker).get("from", "the run it came from")
    raise UserError(
      f"{workdir} is an export{' in int8' if _int8(workdir) else ''}, not a run; export from "
      f"the run's workdir: --workdir={source}"
    )
  config = config_lib.load_saved(workdir)
  abstract, shardings = inference.param_layout(config, None)
  restored = checkpoint.Checkpoints(workdir, warn=warn, reader=True).restore_params(
    abstract, shardings, set_aside=False
  )
  if restored is None:
    raise UserError(
      f"no checkpoint in {storage.join(workdir, checkpoint.CHECKPOINTS)}; train first "
      "(checkpoints are saved every config.checkpoint.every steps and at the end)"
    )
  params, meta = restored
  if weights == "int8":  # loads as it is written: config.model.quant says int8
    params = jax.jit(quantize.quantize_params)(params)
    config.model.quant = "int8"
  out_dir = storage.absolute(out_dir or storage.join(workdir, inference.EXPORT))
  _check_target(storage.absolute(workdir), out_dir)
  ensure_writable_dir(out_dir, "--export_dir")
  if storage.exists(storage.join(out_dir, "params")):
    storage.rmtree(storage.join(out_dir, "params"))
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(storage.join(out_dir, "params"), params)
  checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    for name in ("config.json", "tokenizer.json", chat_template.SAVED):
      if storage.exists(storage.join(workdir, name)):
        storage.copy(storage.join(workdir, name), storage.join(out_dir, name))
    if weights == "int8":  # the run's config, saying so
      with storage.open(storage.join(out_dir, "config.json"), "w") as f:
        json.dump(json.loads(config.to_json_best_effort()), f, indent=2, sort_keys=True)
    with storage.open(storage.join(out_dir, MARKER), "w") as f:
      json.dump({"step": meta["step"], "from": storage.absolute(workdir)}, f)
    try:  # gone once a run training there has rotated it away: then unsaid
      full = storage.size(storage.join(workdir, checkpoint.CHECKPOINTS, str(meta["step"])))
    except FileNotFoundError:  # on a bucket (locally: 0)
      full = 0
    size = storage.size(storage.join(out_dir, "params"))
    print(
      f"exported step {meta['step']} params{' in int8' if weights == 'int8' else ''} to "
      f"{out_dir} ({format_bytes(size)}"
      f"{f'; the training checkpoint is {format_bytes(full)}' if full else ''})",
      flush=True,
    )
  return out_dir, meta


def _check_target(workdir: str, out_dir: str) -> None:
  """An export writes params/, config.json and tokenizer.json: never into a run (its own
  included) nor over another run's export."""
  if out_dir.rstrip("/") == workdir.rstrip("/"):
    raise UserError(
      f"--export_dir={out_dir} is the run's own workdir; leave the flag out (it exports to "
      f"{storage.join(workdir, inference.EXPORT)}) or name another directory"
    )
  marker = storage.join(out_dir, MARKER)
  inside = out_dir.startswith(workdir.rstrip("/") + "/")  # the run's own (even copied or moved)
  if storage.exists(marker):
    if storage.read_json(marker).get("format") == "hf":
      raise UserError(f"--export_dir={out_dir} holds a Hugging Face export; name another directory")
    source = storage.read_json(marker).get("from")
    if source != workdir and not inside:
      raise UserError(
        f"--export_dir={out_dir} holds an export of {source}; delete it or name another directory"
      )
  elif any(
    storage.exists(storage.join(out_dir, n)) for n in ("config.json", checkpoint.CHECKPOINTS)
  ):
    raise UserError(
      f"--export_dir={out_dir} holds a training run, which the export would overwrite; name "
      "a new or empty directory"
    )
  elif names := sorted(storage.listdir(out_dir)):  # no export of ours: e.g. a params/ of theirs
    raise UserError(
      f"--export_dir={out_dir} is not empty (it holds {', '.join(names[:4])}); name a new or "
      "empty directory"
    )


def _int8(directory: str) -> bool:
  try:
    return config_lib.load_saved(directory).model.get("quant") == "int8"
  except UserError:
    return False


def export_hf(workdir: str, out_dir: str | None = None) -> str:
  """--export_format=hf: a run's newest params as a GPT2LMHeadModel directory."""
  run = inference.load(workdir)
  inference.check_float(run.model.cfg.quant, workdir, "be written as Hugging Face's GPT-2")
  out_dir = out_dir or storage.join(workdir, "export_hf")
  _check_hf_target(storage.absolute(workdir), storage.absolute(out_dir))
  for name in HF_FILES:  # a re-export: no file of the last one outlives it (a BPE tokenizer)
    if storage.exists(storage.join(out_dir, name)):
      storage.remove(storage.join(out_dir, name))
  hf.save(run.params, run.model.cfg, out_dir, run.tokenizer)
  if jax.process_index() == 0:
    with storage.open(storage.join(out_dir, MARKER), "w") as f:
      json.dump({"format": "hf", "from": storage.absolute(workdir)}, f)
  print(
    f"wrote {run.where} of {workdir} as a Hugging Face GPT-2 directory {out_dir} (load it with "
    "transformers.GPT2LMHeadModel.from_pretrained)",
    flush=True,
  )
  return out_dir


HF_FILES = ("config.json", "model.safetensors", "tokenizer.json", MARKER)  # what hf.save writes


def _check_hf_target(workdir: str, out_dir: str) -> None:
  """A Hugging Face export goes into a new or empty directory, or over this run's own earlier
  one: never into a run, a gptjax export or a directory of other files, which it would mix."""
  if out_dir.rstrip("/") == workdir.rstrip("/"):
    raise UserError(
      f"--export_dir={out_dir} is the run's own workdir; leave the flag out (it exports to "
      f"{storage.join(workdir, 'export_hf')}) or name another directory"
    )
  names = set(storage.listdir(out_dir))
  marker = storage.join(out_dir, MARKER)
  saved = storage.read_json(marker) if MARKER in names else {}
  ours = saved.get("format") == "hf" and saved.get("from") == workdir
  inside = out_dir.startswith(workdir.rstrip("/") + "/") and saved.get("format", "hf") == "hf"
  if names and not (names <= set(HF_FILES) and (ours or inside)):
    what = f"an export of {saved['from']}" if saved.get("from") else ", ".join(sorted(names)[:4])
    raise UserError(
      f"--export_dir={out_dir} is not empty (it holds {what}), and a Hugging Face export "
      "would mix its files with those; name a new or empty directory"
    )

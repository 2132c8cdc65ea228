"""Hugging Face GPT-2 interop: a local `GPT2LMHeadModel` directory <-> gptjax parameters.

Import (`--config.init_from=hf:DIR`) reads config.json and model.safetensors (sharded
index too) or pytorch_model.bin; export (`--mode=export --export_format=hf`) writes
config.json + model.safetensors that `GPT2LMHeadModel.from_pretrained` loads unchanged.
Names (HF's Conv1D weights are (in, out), i.e. already x @ W like ours; D = d_model,
N = heads, H = D / N, F = d_ff, V = vocabulary):

  transformer.wte.weight (V, D)            wte/embedding (padded V, D); padding rows zero
  transformer.wpe.weight (P, D)            wpe/embedding (block_size, D): the first rows
  transformer.h.{i}.ln_1.weight / bias     h_{i}/ln_1/scale / bias   (ln_2 the same)
  transformer.h.{i}.attn.c_attn.weight     (D, 3D) = [q | k | v] -> h_{i}/attn/{query,key,
                                           value}/kernel (D, N, H); bias (3D) -> (N, H) each
  transformer.h.{i}.attn.c_proj.weight     (D, D) -> h_{i}/attn/out/kernel (N, H, D); bias
  transformer.h.{i}.mlp.c_fc.weight / bias   h_{i}/mlp/up/kernel (D, F) / bias
  transformer.h.{i}.mlp.c_proj.weight / bias h_{i}/mlp/down/kernel (F, D) / bias
  transformer.ln_f.weight / bias           ln_f/scale / bias
  lm_head.weight                           tied to wte (read never, written never)
"""

import json
import os

import numpy as np

from gptjax.errors import UserError, ensure_writable_dir
from gptjax.model import stack_layers, unstack_layers

_PREFIX = "transformer."
# gptjax settings a GPT-2 checkpoint needs: (config key, GPTConfig field, value).
_LAYOUT = [("model.norm", "norm", "layernorm"), ("model.positions", "positions", "learned"),
           ("model.activation", "activation", "gelu"),
           ("model.tie_embeddings", "tie_embeddings", True), ("model.bias", "bias", True)]


def directory(init_from: str) -> str:
  """'hf:DIR' -> DIR, checked to be a GPT-2 directory."""
  path = os.path.expanduser(init_from[len("hf:"):])
  read_config(path)
  return path


def read_config(hf_dir: str) -> dict:
  path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(path):
    raise UserError(f"{hf_dir!r} is not a Hugging Face model directory (no config.json); "
                    "pass --config.init_from=hf:DIR with a saved GPT2LMHeadModel")
  with open(path) as f:
    hf = json.load(f)
  found = ", ".join(hf.get("architectures") or []) or hf.get("model_type", "unknown")
  if hf.get("model_type") != "gpt2":
    raise UserError(f"{hf_dir} holds a {found} model (model_type "
                    f"{hf.get('model_type')!r}), not GPT-2; only GPT-2 checkpoints import")
  supported = {  # key: (HF's default, what gptjax's GPT-2 computes)
      "activation_function": ("gelu_new", ("gelu_new", "gelu_pytorch_tanh")),
      "scale_attn_weights": (True, (True,)),
      "scale_attn_by_inverse_layer_idx": (False, (False,)),
      "add_cross_attention": (False, (False,))}
  for key, (default, allowed) in supported.items():
    if hf.get(key, default) not in allowed:
      raise UserError(f"{hf_dir}/config.json sets {key}={hf[key]!r}, which gptjax's GPT-2 "
                      "does not implement")
  return hf


def read_tensors(hf_dir: str) -> dict[str, np.ndarray]:
  """Every tensor of the checkpoint as float32 numpy, names without 'transformer.'."""
  single = os.path.join(hf_dir, "model.safetensors")
  index = os.path.join(hf_dir, "model.safetensors.index.json")
  binary = os.path.join(hf_dir, "pytorch_model.bin")
  if os.path.isfile(single) or os.path.isfile(index):
    from safetensors import safe_open
    if os.path.isfile(single):
      files = [single]
    else:
      with open(index) as f:
        files = sorted({os.path.join(hf_dir, v) for v in json.load(f)["weight_map"].values()})
    out = {}
    for path in files:
      with safe_open(path, framework="flax") as f:  # jax arrays: bfloat16 files read too
        for k in f.keys():
          out[k] = np.asarray(f.get_tensor(k), np.float32)
  elif os.path.isfile(binary):
    try:
      import torch
    except ImportError:
      raise UserError(f"{binary} needs torch to read (pip install torch), or save the "
                      "model with safe_serialization=True") from None
    state = torch.load(binary, map_location="cpu", weights_only=True)
    out = {k: v.float().numpy() for k, v in state.items()}
  else:
    raise UserError(f"{hf_dir} has no model.safetensors, model.safetensors.index.json or "
                    "pytorch_model.bin")
  return {k[len(_PREFIX):] if k.startswith(_PREFIX) else k: v for k, v in out.items()}


def check_layout(cfg) -> None:
  """GPT-2 weights only fit a GPT-2-layout model; name the first setting that differs."""
  for key, field, want in _LAYOUT:
    if getattr(cfg, field) != want:
      raise UserError(f"config.{key}={getattr(cfg, field)!r}, but GPT-2 weights need "
                      f"{want!r}; drop that override")


def to_params(tensors: dict, cfg, hf_config: dict) -> dict:
  """HF tensors -> a gptjax params tree (numpy, cfg.param_dtype), every shape checked."""
  check_layout(cfg)
  d, n, v = cfg.d_model, cfg.n_head, cfg.vocab_size
  if hf_config.get("n_head") != n:
    raise UserError(f"the checkpoint has n_head={hf_config.get('n_head')} but "
                    f"config.model.n_head={n}; use the experiment with its shape")
  layers = {int(k.split(".")[1]) for k in tensors if k.startswith("h.")}
  if layers and max(layers) + 1 > cfg.n_layer:
    raise UserError(f"the checkpoint has {max(layers) + 1} layers (tensor "
                    f"transformer.h.{max(layers)}.*) but config.model.n_layer={cfg.n_layer}")

  def get(name, shape):
    if name not in tensors:
      raise UserError(f"tensor {_PREFIX}{name} is missing from the checkpoint (config.model."
                      f"n_layer={cfg.n_layer}, d_model={d}); use the experiment with its shape")
    x = tensors[name]
    if x.shape != tuple(shape):
      raise UserError(f"tensor {_PREFIX}{name} has shape {x.shape} but the config needs "
                      f"{tuple(shape)} (n_layer={cfg.n_layer}, n_head={n}, d_model={d}, "
                      f"d_ff={cfg.d_ff}, vocab={v}, block_size={cfg.block_size}); use the "
                      "experiment with the checkpoint's shape")
    return x

  wte = get("wte.weight", (v, d))
  positions = tensors["wpe.weight"].shape[0] if "wpe.weight" in tensors else cfg.block_size
  wpe = get("wpe.weight", (max(positions, cfg.block_size), d))  # a shorter context is fine
  params = {"wte": {"embedding": np.pad(wte, ((0, cfg.padded_vocab - v), (0, 0)))},
            "wpe": {"embedding": wpe[:cfg.block_size]},
            "ln_f": _norm(get, "ln_f", d)}
  for i in range(cfg.n_layer):
    p = f"h.{i}."
    qkv_w = get(p + "attn.c_attn.weight", (d, 3 * d)).reshape(d, 3, n, d // n)
    qkv_b = get(p + "attn.c_attn.bias", (3 * d,)).reshape(3, n, d // n)
    params[f"h_{i}"] = {
        "ln_1": _norm(get, p + "ln_1", d), "ln_2": _norm(get, p + "ln_2", d),
        "attn": {name: {"kernel": qkv_w[:, j], "bias": qkv_b[j]}
                 for j, name in enumerate(("query", "key", "value"))} | {
            "out": {"kernel": get(p + "attn.c_proj.weight", (d, d)).reshape(n, d // n, d),
                    "bias": get(p + "attn.c_proj.bias", (d,))}},
        "mlp": {"up": {"kernel": get(p + "mlp.c_fc.weight", (d, cfg.d_ff)),
                       "bias": get(p + "mlp.c_fc.bias", (cfg.d_ff,))},
                "down": {"kernel": get(p + "mlp.c_proj.weight", (cfg.d_ff, d)),
                         "bias": get(p + "mlp.c_proj.bias", (d,))}}}
  dtype = np.dtype(cfg.param_dtype)
  params = _map(lambda x: np.ascontiguousarray(x, dtype), params)
  return stack_layers(params, cfg.n_layer, np) if cfg.scan_layers else params


def _norm(get, name, d):
  return {"scale": get(name + ".weight", (d,)), "bias": get(name + ".bias", (d,))}


def _map(fn, tree):
  return {k: _map(fn, v) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


def load_params(init_from: str, cfg) -> dict:
  """--config.init_from=hf:DIR -> gptjax params (numpy) for the model config `cfg`."""
  hf_dir = directory(init_from)
  return to_params(read_tensors(hf_dir), cfg, read_config(hf_dir))


def from_params(params, cfg) -> dict[str, np.ndarray]:
  """gptjax params -> HF tensors (float32, names with 'transformer.')."""
  check_layout(cfg)
  if cfg.scan_layers:  # one stacked "h", as to_params makes it
    params = unstack_layers(params)
  p = _map(lambda x: np.asarray(x, np.float32), params)
  d = cfg.d_model
  out = {"wte.weight": p["wte"]["embedding"][:cfg.vocab_size],
         "wpe.weight": p["wpe"]["embedding"],
         "ln_f.weight": p["ln_f"]["scale"], "ln_f.bias": p["ln_f"]["bias"]}
  for i in range(cfg.n_layer):
    h, pre = p[f"h_{i}"], f"h.{i}."
    attn = h["attn"]
    out |= {
        pre + "ln_1.weight": h["ln_1"]["scale"], pre + "ln_1.bias": h["ln_1"]["bias"],
        pre + "ln_2.weight": h["ln_2"]["scale"], pre + "ln_2.bias": h["ln_2"]["bias"],
        pre + "attn.c_attn.weight": np.concatenate(
            [attn[k]["kernel"].reshape(d, d) for k in ("query", "key", "value")], axis=1),
        pre + "attn.c_attn.bias": np.concatenate(
            [attn[k]["bias"].reshape(d) for k in ("query", "key", "value")]),
        pre + "attn.c_proj.weight": attn["out"]["kernel"].reshape(d, d),
        pre + "attn.c_proj.bias": attn["out"]["bias"],
        pre + "mlp.c_fc.weight": h["mlp"]["up"]["kernel"],
        pre + "mlp.c_fc.bias": h["mlp"]["up"]["bias"],
        pre + "mlp.c_proj.weight": h["mlp"]["down"]["kernel"],
        pre + "mlp.c_proj.bias": h["mlp"]["down"]["bias"]}
  return {_PREFIX + k: np.ascontiguousarray(v) for k, v in out.items()}


def save(params, cfg, out_dir: str, tokenizer=None) -> None:
  """Writes a GPT2LMHeadModel directory: config.json, model.safetensors (+ tokenizer.json
  when the tokenizer is a Hugging Face BPE)."""
  from safetensors.numpy import save_file
  ensure_writable_dir(out_dir, "--export_dir")
  tensors = from_params(params, cfg)
  eot = tokenizer.eot_id if tokenizer is not None else cfg.vocab_size - 1
  config = {
      "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
      "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_embd": cfg.d_model,
      "n_layer": cfg.n_layer, "n_head": cfg.n_head,
      "n_inner": None if cfg.d_ff == 4 * cfg.d_model else cfg.d_ff,
      "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps,
      "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.attn_dropout,
      "initializer_range": cfg.init_std, "bos_token_id": eot, "eos_token_id": eot,
      "tie_word_embeddings": True, "scale_attn_weights": True, "use_cache": True,
      "torch_dtype": "float32"}
  save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  if getattr(tokenizer, "hf_json", None):
    with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
      f.write(tokenizer.hf_json)


def export(workdir: str, out_dir: str | None = None) -> str:
  """--mode=export --export_format=hf: a run's newest params as a GPT2LMHeadModel directory."""
  from gptjax import sample
  model, params, tokenizer, where = sample.load(workdir)
  out_dir = out_dir or os.path.join(workdir, "export_hf")
  save(params, model.cfg, out_dir, tokenizer)
  print(f"wrote {where} of {workdir} as a Hugging Face GPT-2 directory {out_dir} (load it with "
        "transformers.GPT2LMHeadModel.from_pretrained)", flush=True)
  return out_dir

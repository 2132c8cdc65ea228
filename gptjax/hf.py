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
  lm_head.weight (V, D)                    tie_word_embeddings=True (transformers' default):
                                           wte, never read or written; False: lm_head/kernel
                                           (D, padded V), padding columns zero

config.json says what the tensors cannot (check_config): n_head, tie_embeddings, norm eps.
"""

import json
import math
import os
import pickle
import zipfile

import numpy as np

from gptjax import storage
from gptjax.errors import UserError, describe
from gptjax.model import layer_name, per_layer, to_layout

_PREFIX = "transformer."
_QKV = ("query", "key", "value")  # c_attn's three parts, in order
_HEAD = "lm_head.weight"  # the one name outside "transformer."
_SINGLE, _INDEX, _BINARY = "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"
_RESAVE = "re-save the model with save_pretrained"
_TORCH_LEGACY = b"\x80\x02\x8a\x0a"  # torch.save before 1.6: a pickled magic number first
# gptjax settings a GPT-2 checkpoint needs: (config key, GPTConfig field, value).
_LAYOUT = [
  ("model.norm", "norm", "layernorm"),
  ("model.positions", "positions", "learned"),
  ("model.activation", "activation", "gelu"),
  ("model.bias", "bias", True),
]


def directory(init_from: str, model=None) -> str:
  """'hf:DIR' -> DIR, checked to be a GPT-2 directory with its weight files, cheaply (config
  and safetensors headers only), so a wrong one fails before data preparation and compiling.

  model: config.model or a GPTConfig, to check against config.json too (check_config)."""
  path = os.path.expanduser(init_from[len("hf:") :])
  hf_config = read_config(path)
  for file in weight_files(path):
    if file.endswith(".safetensors"):
      _read_safetensors(file, tensors=False)
    else:
      _check_bin(file)
  if model is not None:
    check_config(model, hf_config)
  return path


def _read_json(path: str) -> dict:
  try:
    out = json.loads(storage.read_text(path))
  except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
    raise UserError(f"{path} is not readable JSON ({describe(e)}); {_RESAVE}") from None
  if not isinstance(out, dict):
    raise UserError(f"{path} holds a JSON {type(out).__name__}, not an object; {_RESAVE}")
  return out


def read_config(hf_dir: str) -> dict:
  path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(path):
    raise UserError(
      f"{hf_dir!r} is not a Hugging Face model directory (no config.json); "
      "pass --config.init_from=hf:DIR with a saved GPT2LMHeadModel"
    )
  hf = _read_json(path)
  found = ", ".join(hf.get("architectures") or []) or hf.get("model_type", "unknown")
  if hf.get("model_type") != "gpt2":
    raise UserError(
      f"{hf_dir} holds a {found} model (model_type "
      f"{hf.get('model_type')!r}), not GPT-2; only GPT-2 checkpoints import"
    )
  # key: (HF's default, what gptjax's GPT-2 computes). reorder_and_upcast_attn is accepted:
  # it only computes attention scores in float32, as gptjax always does.
  supported = {
    "activation_function": ("gelu_new", ("gelu_new", "gelu_pytorch_tanh")),
    "scale_attn_weights": (True, (True,)),
    "scale_attn_by_inverse_layer_idx": (False, (False,)),
    "add_cross_attention": (False, (False,)),
  }
  for key, (default, allowed) in supported.items():
    if hf.get(key, default) not in allowed:
      raise UserError(
        f"{hf_dir}/config.json sets {key}={hf[key]!r}, which gptjax's GPT-2 does not implement"
      )
  return hf


def weight_files(hf_dir: str) -> list[str]:
  """The checkpoint's weight files, each checked to exist: model.safetensors, else the shards
  its index names, else pytorch_model.bin."""
  single, index, binary = (os.path.join(hf_dir, n) for n in (_SINGLE, _INDEX, _BINARY))
  if os.path.isfile(single):
    return [single]
  if os.path.isfile(index):
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
      raise UserError(f"{index} has no weight_map; {_RESAVE}")
    files = sorted({os.path.join(hf_dir, v) for v in weight_map.values()})
    missing = [os.path.basename(f) for f in files if not os.path.isfile(f)]
    if missing:
      raise UserError(
        f"{index} names shard {missing[0]}, which is not in {hf_dir} "
        f"({len(missing)} of {len(files)} shards missing); copy every shard there"
      )
    return files
  if os.path.isfile(binary):
    return [binary]
  raise UserError(
    f"{hf_dir} has config.json but no weights (looked for {_SINGLE}, {_INDEX} "
    f"and {_BINARY}); save the model there with save_pretrained"
  )


def read_tensors(hf_dir: str) -> dict[str, np.ndarray]:
  """Every tensor of the checkpoint as float32 numpy, names without 'transformer.'."""
  out = {}
  for file in weight_files(hf_dir):
    out |= _read_safetensors(file) if file.endswith(".safetensors") else _read_bin(file)
  return {k[len(_PREFIX) :] if k.startswith(_PREFIX) else k: v for k, v in out.items()}


def _read_safetensors(path: str, tensors: bool = True) -> dict[str, np.ndarray]:
  """The file's tensors; tensors=False checks its header only (nothing else is read)."""
  from safetensors import SafetensorError, safe_open

  try:
    with safe_open(path, framework="flax") as f:  # jax arrays: bfloat16 files read too
      return {k: np.asarray(f.get_tensor(k), np.float32) for k in f.keys()} if tensors else {}
  except (SafetensorError, OSError) as e:
    raise UserError(
      f"{path} is not a readable safetensors file ({describe(e)}); {_RESAVE}"
    ) from None


def _check_bin(path: str) -> None:
  """torch.save writes a zip archive (legacy: a pickle); seen from a few bytes, not loaded."""
  with open(path, "rb") as f:
    legacy = f.read(len(_TORCH_LEGACY)) == _TORCH_LEGACY
  if not (legacy or zipfile.is_zipfile(path)):
    raise UserError(
      f"{path} is not a readable PyTorch state dict (neither torch.save's zip "
      f"archive nor its legacy pickle); {_RESAVE}"
    )


def _read_bin(path: str) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError:
    raise UserError(
      f"{path} needs torch to read (pip install torch), or {_RESAVE} (safe_serialization=True)"
    ) from None
  try:  # weights_only: tensors and plain containers, never arbitrary pickled code
    state = torch.load(path, map_location="cpu", weights_only=True)
  except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as e:
    # torch's own message for a refused pickle advises weights_only=False: never repeat it
    why = "not a pickled dict of tensors" if "weights_only" in str(e) else describe(e)
    raise UserError(f"{path} is not a readable PyTorch state dict ({why}); {_RESAVE}") from None
  if not (isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())):
    raise UserError(
      f"{path} holds a {type(state).__name__}, not a state dict of tensors "
      f"(torch.save(model.state_dict(), ...)); {_RESAVE}"
    )
  return {k: v.float().numpy() for k, v in state.items()}


def check_layout(cfg, exporting: bool = False) -> None:
  """GPT-2 weights only fit a GPT-2-layout model; name the first setting that differs.

  Importing, the user's config is the fix; exporting, the run is what it is."""
  for key, field, want in _LAYOUT:
    have = getattr(cfg, field)
    if have == want or (exporting and field == "bias"):  # no bias exports as zero biases
      continue
    if exporting:
      raise UserError(
        f"this run was trained with config.{key}={have!r}, which Hugging Face "
        f"GPT-2 cannot hold (it needs {want!r}); export it with "
        "--export_format=gptjax instead"
      )
    raise UserError(
      f"config.{key}={have!r}, but GPT-2 weights need {want!r}: set "
      f"--config.{key}={want!r}"
      + (" (the experiment sets it; GPT-2 has biases)" if field == "bias" else "")
    )


def check_config(cfg, hf_config: dict) -> None:
  """The gptjax settings config.json fixes, checked. cfg: a GPTConfig or config.model (the
  same field names). A mismatch is refused, naming the flag, since the caller builds its
  model from cfg: applying config.json here would leave that model out of step."""
  check_layout(cfg)
  if hf_config.get("n_head") != cfg.n_head:
    raise UserError(
      f"the checkpoint has n_head={hf_config.get('n_head')} but "
      f"config.model.n_head={cfg.n_head}; use the experiment with its shape"
    )
  tied = bool(hf_config.get("tie_word_embeddings", True))  # transformers' default
  if tied != cfg.tie_embeddings:
    raise UserError(
      f"the checkpoint has tie_word_embeddings={tied} but "
      f"config.model.tie_embeddings={cfg.tie_embeddings}; pass "
      f"--config.model.tie_embeddings={str(tied).lower()}"
    )
  eps = hf_config.get("layer_norm_epsilon", 1e-5)  # transformers' default
  if not math.isclose(eps, cfg.norm_eps, rel_tol=1e-6):
    raise UserError(
      f"the checkpoint has layer_norm_epsilon={eps} but config.model.norm_eps="
      f"{cfg.norm_eps}; pass --config.model.norm_eps={eps}"
    )


def to_params(tensors: dict, cfg, hf_config: dict) -> dict:
  """HF tensors -> a gptjax params tree (numpy, cfg.param_dtype), every shape checked."""
  check_config(cfg, hf_config)
  d, n, v = cfg.d_model, cfg.n_head, cfg.vocab_size
  layers = {int(k.split(".")[1]) for k in tensors if k.startswith("h.")}
  if layers and max(layers) + 1 > cfg.n_layer:
    raise UserError(
      f"the checkpoint has {max(layers) + 1} layers (tensor "
      f"transformer.h.{max(layers)}.*) but config.model.n_layer={cfg.n_layer}"
    )

  def get(name, shape):
    full = name if name == _HEAD else _PREFIX + name
    if name not in tensors:
      raise UserError(
        f"tensor {full} is missing from the checkpoint (config.model."
        f"n_layer={cfg.n_layer}, d_model={d}); use the experiment with its shape"
      )
    x = tensors[name]
    if x.shape != tuple(shape):
      raise UserError(
        f"tensor {full} has shape {x.shape} but the config needs "
        f"{tuple(shape)} (n_layer={cfg.n_layer}, n_head={n}, d_model={d}, "
        f"d_ff={cfg.d_ff}, vocab={v}, block_size={cfg.block_size}); use the "
        "experiment with the checkpoint's shape"
      )
    return x

  wte = get("wte.weight", (v, d))
  positions = tensors["wpe.weight"].shape[0] if "wpe.weight" in tensors else cfg.block_size
  wpe = get("wpe.weight", (max(positions, cfg.block_size), d))  # a shorter context is fine
  params = {
    "wte": {"embedding": np.pad(wte, ((0, cfg.padded_vocab - v), (0, 0)))},
    "wpe": {"embedding": wpe[: cfg.block_size]},
    "ln_f": _norm(get, "ln_f", d),
  }
  if not cfg.tie_embeddings:  # nn.Linear's (V, D) -> our (D, padded V) kernel
    params["lm_head"] = {
      "kernel": np.pad(get(_HEAD, (v, d)).T, ((0, 0), (0, cfg.padded_vocab - v)))
    }
  for i in range(cfg.n_layer):
    params[layer_name(i)] = _layer(get, f"h.{i}.", cfg)
  dtype = np.dtype(cfg.param_dtype)
  params = _map(lambda x: np.ascontiguousarray(x, dtype), params)
  return to_layout(params, cfg, np)


def _layer(get, p: str, cfg) -> dict:
  """Block p ('h.{i}.') of HF's GPT-2 -> gptjax's per-layer params (q, k, v split by head)."""
  d, n = cfg.d_model, cfg.n_head
  qkv_w = get(p + "attn.c_attn.weight", (d, 3 * d)).reshape(d, 3, n, d // n)
  qkv_b = get(p + "attn.c_attn.bias", (3 * d,)).reshape(3, n, d // n)
  attn = {name: {"kernel": qkv_w[:, j], "bias": qkv_b[j]} for j, name in enumerate(_QKV)}
  attn["out"] = {
    "kernel": get(p + "attn.c_proj.weight", (d, d)).reshape(n, d // n, d),
    "bias": get(p + "attn.c_proj.bias", (d,)),
  }
  mlp = {
    "up": {
      "kernel": get(p + "mlp.c_fc.weight", (d, cfg.d_ff)),
      "bias": get(p + "mlp.c_fc.bias", (cfg.d_ff,)),
    },
    "down": {
      "kernel": get(p + "mlp.c_proj.weight", (cfg.d_ff, d)),
      "bias": get(p + "mlp.c_proj.bias", (d,)),
    },
  }
  return {
    "ln_1": _norm(get, p + "ln_1", d),
    "ln_2": _norm(get, p + "ln_2", d),
    "attn": attn,
    "mlp": mlp,
  }


def _norm(get, name, d):
  return {"scale": get(name + ".weight", (d,)), "bias": get(name + ".bias", (d,))}


def _map(fn, tree):
  return {k: _map(fn, v) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


def load_params(init_from: str, cfg) -> dict:
  """--config.init_from=hf:DIR -> gptjax params (numpy) for the model config `cfg`."""
  hf_dir = directory(init_from)
  return to_params(read_tensors(hf_dir), cfg, read_config(hf_dir))


def from_params(params, cfg) -> dict[str, np.ndarray]:
  """gptjax params -> HF tensors (float32, names with 'transformer.', lm_head.weight when
  untied)."""
  check_layout(cfg, exporting=True)
  params = per_layer(params, cfg)
  p = _map(lambda x: np.asarray(x, np.float32), params)
  d = cfg.d_model
  # A model without biases (bias=False, nanoGPT's default) is exactly GPT-2 with zero biases.
  bias = lambda node, n: node["bias"].reshape(n) if "bias" in node else np.zeros(n, np.float32)
  out = {
    "wte.weight": p["wte"]["embedding"][: cfg.vocab_size],
    "wpe.weight": p["wpe"]["embedding"],
    "ln_f.weight": p["ln_f"]["scale"],
    "ln_f.bias": bias(p["ln_f"], d),
  }
  for i in range(cfg.n_layer):
    h, pre = p[layer_name(i)], f"h.{i}."
    attn = h["attn"]
    out |= {
      pre + "ln_1.weight": h["ln_1"]["scale"],
      pre + "ln_1.bias": bias(h["ln_1"], d),
      pre + "ln_2.weight": h["ln_2"]["scale"],
      pre + "ln_2.bias": bias(h["ln_2"], d),
      pre + "attn.c_attn.weight": np.concatenate(
        [attn[k]["kernel"].reshape(d, d) for k in _QKV], axis=1
      ),
      pre + "attn.c_attn.bias": np.concatenate([bias(attn[k], d) for k in _QKV]),
      pre + "attn.c_proj.weight": attn["out"]["kernel"].reshape(d, d),
      pre + "attn.c_proj.bias": bias(attn["out"], d),
      pre + "mlp.c_fc.weight": h["mlp"]["up"]["kernel"],
      pre + "mlp.c_fc.bias": bias(h["mlp"]["up"], cfg.d_ff),
      pre + "mlp.c_proj.weight": h["mlp"]["down"]["kernel"],
      pre + "mlp.c_proj.bias": bias(h["mlp"]["down"], d),
    }
  out = {_PREFIX + k: v for k, v in out.items()}
  if not cfg.tie_embeddings:
    out[_HEAD] = p["lm_head"]["kernel"][:, : cfg.vocab_size].T
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def save(params, cfg, out_dir: str, tokenizer=None) -> None:
  """Writes a GPT2LMHeadModel directory: config.json, model.safetensors (+ tokenizer.json
  when the tokenizer is a Hugging Face BPE)."""
  tensors = from_params(params, cfg)  # a model GPT-2 cannot hold fails before any mkdir
  storage.ensure_writable_dir(out_dir, "--export_dir")
  eot = tokenizer.eot_id if tokenizer is not None else cfg.vocab_size - 1
  config = {
    "architectures": ["GPT2LMHeadModel"],
    "model_type": "gpt2",
    "vocab_size": cfg.vocab_size,
    "n_positions": cfg.block_size,
    "n_embd": cfg.d_model,
    "n_layer": cfg.n_layer,
    "n_head": cfg.n_head,
    "n_inner": None if cfg.d_ff == 4 * cfg.d_model else cfg.d_ff,
    "activation_function": "gelu_new",
    "layer_norm_epsilon": cfg.norm_eps,
    "resid_pdrop": cfg.dropout,
    "embd_pdrop": cfg.dropout,
    "attn_pdrop": cfg.attn_dropout,
    "initializer_range": cfg.init_std,
    "bos_token_id": eot,
    "eos_token_id": eot,
    "tie_word_embeddings": cfg.tie_embeddings,
    "scale_attn_weights": True,
    "use_cache": True,
    "torch_dtype": "float32",
  }
  from safetensors.numpy import save_file

  weights = storage.join(out_dir, "model.safetensors")  # a bucket: written here, uploaded
  local = storage.local_copy(weights, fetch=False)
  save_file(tensors, local, metadata={"format": "pt"})
  if local != weights:
    storage.upload(local, weights)
  storage.write_text(storage.join(out_dir, "config.json"), json.dumps(config, indent=2))
  if getattr(tokenizer, "hf_json", None):
    storage.write_text(storage.join(out_dir, "tokenizer.json"), tokenizer.hf_json)

"""Default configuration and its validation.

Experiment files in experiments/ start from `default_config()` and override only what
differs (nanoGPT's habit). Every key exists here with a sensible default, so ml_collections
can type-check `--config.a.b=value` overrides and reject unknown keys by name.
"""

import json
import math

from ml_collections import config_dict

from gptjax import storage
from gptjax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

CHOICES = {
  "model.norm": ("layernorm", "rmsnorm"),
  "model.positions": ("learned", "rope"),
  "model.activation": ("gelu", "swiglu"),
  "model.attention": ("auto", "xla", "cudnn"),
  "model.remat": ("none", "dots", "dots_no_batch", "full"),
  "model.dtype": ("auto", "float32", "bfloat16", "float16"),
  "model.param_dtype": ("float32", "bfloat16"),
  "model.quant": ("none", "int8"),
  "model.kv_quant": ("none", "int8"),
  "data.source": ("tfds", "text", "task"),
  "data.tokenizer": ("char", "byte", "bpe", "sentencepiece"),
}


def default_config() -> config_dict.ConfigDict:
  """GPT-2 small on tiny Shakespeare (char level): every key, with its default."""
  c = config_dict.ConfigDict()
  c.seed = 0
  # Start from other weights: a gptjax run's workdir or export (its newest checkpoint, else
  # its export; the model's shape and tokenizer come with it), or "hf:DIR", a Hugging Face
  # GPT-2 directory (config.json + model.safetensors); the model config must have its shapes.
  c.init_from = config_dict.placeholder(str)
  # JAX's persistent compilation cache ('' turns it off): reruns and resumed jobs of the
  # same shapes skip compiling.
  c.compilation_cache_dir = "~/.cache/gptjax/jax"
  # JAX devices to split a CPU-only host into (a device count in XLA_FLAGS wins); the mesh's
  # data axis then runs one batch shard per device. -1: one per core (as many as divide the
  # batch). 2 devices on 2 cores train :cpu Shakespeare ~1.4x faster, but jaxlib 0.10's
  # in-process CPU all-reduce has deadlocked (XLA aborts after 40 s) in benchmark loops, so
  # XLA's default of one device (whose ops use every core) stays the default. See BUILD_NOTES.
  c.cpu_devices = 1

  c.model = config_dict.ConfigDict()
  c.model.n_layer = 12
  c.model.n_head = 12
  c.model.d_model = 768
  c.model.d_ff = config_dict.placeholder(int)  # None: 4*d_model (gelu), ~8/3*d_model (swiglu)
  c.model.block_size = 1024  # context length, and the training sequence length
  c.model.vocab_size = config_dict.placeholder(int)  # None: the tokenizer's
  c.model.vocab_multiple = 64  # pad the embedding rows to a multiple of this (speed)
  c.model.dropout = 0.0  # embeddings and residual branches
  c.model.attn_dropout = 0.0  # > 0 uses the explicit (non-flash) attention while training
  c.model.norm = "layernorm"
  c.model.norm_eps = 1e-5
  c.model.positions = "learned"
  c.model.rope_theta = 10000.0
  c.model.activation = "gelu"
  c.model.tie_embeddings = True
  c.model.bias = True
  c.model.dtype = "auto"  # compute dtype; auto: bfloat16 on GPU/TPU, float32 on CPU
  c.model.param_dtype = "float32"
  c.model.attention = "auto"  # auto: cudnn flash attention on GPU with 16-bit compute
  c.model.init_std = 0.02
  # Activation rematerialisation per block (model.REMAT_POLICIES): none | dots |
  # dots_no_batch | full. Trades recomputation for memory (bigger batches, longer context).
  c.model.remat = "none"
  # nn.scan over the blocks: parameters (and KV caches) stacked on a leading "layers" axis.
  # Compiles one block instead of n_layer (deep models compile in seconds) and lets FSDP
  # gather one layer's weights at a time. Checkpoints differ in layout (h vs h_0..h_{L-1}).
  c.model.scan_layers = False
  # Inference only (quantize.py): int8 weights with a float scale per output channel (an
  # int8 export says so; --quantize=int8 converts a float run when it loads), and an int8
  # KV cache with a scale per token and head (--kv_quant=int8).
  c.model.quant = "none"
  c.model.kv_quant = "none"

  c.data = config_dict.ConfigDict()
  c.data.source = "tfds"
  c.data.tfds_name = "tiny_shakespeare"
  c.data.train_split = "train"
  c.data.val_split = "validation"
  c.data.text_feature = "text"
  c.data.data_dir = config_dict.placeholder(str)  # None: TFDS's default (~/tensorflow_datasets)
  c.data.manual_dir = config_dict.placeholder(str)  # local copy of the dataset's files
  c.data.download_retries = config_dict.placeholder(int)  # None: TFDS's default (10)
  c.data.path = config_dict.placeholder(str)  # source=text: a file, or a glob of files
  c.data.val_fraction = 0.1  # source=text: the tail of the corpus held out for evals
  c.data.tokenizer = "char"
  # source=task (fine-tuning): data.path is a JSONL file or glob of conversations
  # ({"messages": [...]}) or prompt/completion records (gptjax/task_data.py).
  c.data.val_path = config_dict.placeholder(str)  # None: the last val_fraction of the records
  c.data.prompt_field = "prompt"
  c.data.completion_field = "completion"
  # How conversations become text, for training, chat and evaluation alike: a built-in
  # (chat_template.BUILTIN: play, plain, gpt2) or a Jinja2 file.
  c.data.chat_template = "play"
  c.data.train_on_all = False  # task: weigh every token, not only the assistant's replies
  # bpe: a tokenizer.json, or a directory with it or vocab.json + merges.txt (None: the
  # init_from directory's files if any, else tiktoken's gpt2); sentencepiece: a .model file.
  c.data.tokenizer_path = config_dict.placeholder(str)
  # A workdir on a bucket: each host memory-maps the run's token files from here (by key)
  c.data.cache_dir = "~/.cache/gptjax/data"

  c.optim = config_dict.ConfigDict()
  c.optim.lr = 6e-4
  c.optim.min_lr = 6e-5
  c.optim.warmup_steps = 100
  c.optim.decay_steps = config_dict.placeholder(int)  # None: train.num_steps
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.1  # never applied to biases, norms or embeddings
  c.optim.grad_clip = 1.0  # global norm; 0 disables
  c.optim.grad_accum = 1  # microbatches per step (a lax.scan inside the step)

  c.train = config_dict.ConfigDict()
  c.train.batch_size = 64  # global batch, in sequences
  c.train.num_steps = 5000
  c.train.log_every = 10
  c.train.eval_every = 250
  c.train.eval_batches = 20
  c.train.label_smoothing = 0.0
  # 0: the whole (B, T, V) logits, then the loss. N > 0: the LM head and the loss N positions
  # at a time, gradients in the same pass (gptjax/loss.py): no full logits in memory.
  c.train.loss_chunk = 0

  # Checkpoints (gptjax/checkpoint.py): also saved at the end and on SIGTERM/SIGINT.
  c.checkpoint = config_dict.ConfigDict()
  c.checkpoint.every = 1000  # steps between saves; 0: only at the end and on preemption
  c.checkpoint.keep = 3  # the newest K are kept
  c.checkpoint.keep_best = False  # also keep the lowest-val-loss state in checkpoints_best/
  c.checkpoint.async_save = True  # write in the background while training goes on

  # Sharding (gptjax/sharding.py): the mesh, and which mesh axes each logical dimension uses.
  c.mesh = config_dict.ConfigDict()
  c.mesh.shape = config_dict.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})  # -1: fill
  c.mesh.dcn_shape = config_dict.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1})  # across
  # slices (TPU multi-slice) or hosts (GPU): the slow links; mesh.shape is within one.
  c.mesh.rules = config_dict.ConfigDict(
    {  # comma-separated mesh axes; '' = replicated
      "batch": "data,fsdp",
      "length": "",
      "vocab": "tensor",
      "embed": "fsdp",
      "heads": "tensor",
      "kv": "",
      "mlp": "tensor",
      "layers": "",
    }
  )

  # Several processes (hosts): set all three, or run under SLURM / Open MPI with auto on.
  c.distributed = config_dict.ConfigDict()
  c.distributed.coordinator_address = config_dict.placeholder(str)  # host:port of process 0
  c.distributed.num_processes = config_dict.placeholder(int)
  c.distributed.process_id = config_dict.placeholder(int)
  c.distributed.timeout_s = 300  # how long to wait for every process to join
  # A process whose heartbeats stop this long is dead (JAX's heartbeat timeout; its default
  # is 100). gptjax's own watch names it at half this and the others exit in one line; a
  # failed collective says so sooner.
  c.distributed.heartbeat_timeout_s = 60
  c.distributed.auto = True  # join a detected SLURM / Open MPI job of more than one task
  return c


def _largest_divisor(n: int, at_most: int) -> int:
  return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


# (key, lowest allowed, highest allowed or None, whether the highest is excluded)
_RANGES = (
  *((k, 1, None, False) for k in (
    "model.n_layer", "model.n_head", "model.d_model", "model.block_size",
    "model.vocab_multiple", "train.batch_size", "train.num_steps", "train.log_every",
    "train.eval_every", "train.eval_batches", "optim.grad_accum", "checkpoint.keep",
    "model.d_ff", "model.vocab_size", "optim.decay_steps", "model.rope_theta")),  # None: default
  # fmt: skip
  *((k, 0, None, False) for k in (
    "checkpoint.every", "optim.min_lr", "optim.weight_decay", "optim.grad_clip",
    "optim.warmup_steps", "train.loss_chunk")),  # fmt: skip
  *((k, 0.0, 1.0, True) for k in (
    "model.dropout", "model.attn_dropout", "train.label_smoothing", "optim.b1", "optim.b2")),
)  # fmt: skip


def validate(config: config_dict.ConfigDict) -> None:
  """Raise UserError naming the first bad value and its fix. Every check that needs only
  the config is here (the mesh's fit to the devices and the data's size are checked where
  those are known)."""
  values = dict(leaves(config))
  for key, value in values.items():  # NaN passes every `<` check below: refuse it first
    if isinstance(value, float) and not math.isfinite(value):
      raise UserError(f"config.{key}={value} is not a finite number; pass a finite --config.{key}")
  for key, allowed in CHOICES.items():
    if values[key] not in allowed:
      raise UserError(
        f"config.{key}={values[key]!r} is not one of {', '.join(allowed)}; "
        f"pass --config.{key}=<one of those>"
      )
  for key, low, high, open_high in _RANGES:
    value = low if values[key] is None else values[key]  # None: a default computed later
    if value < low or (high is not None and (value >= high if open_high else value > high)):
      bounds = f"in [{low}, {high})" if high is not None else f"at least {low}"
      raise UserError(f"config.{key}={value} must be {bounds}")
  for check in (_check_model, _check_training, _check_data, _check_mesh, _check_distributed):
    check(config)


def check_trainable(config) -> None:
  """What only inference runs: int8 weights or KV cache (quantize.py)."""
  if "int8" in (config.model.quant, config.model.kv_quant):
    raise UserError(
      "int8 weights or KV cache are for inference (sample, chat, serve, bench decode); "
      "train in float: leave config.model.quant/kv_quant at none (init_from a float run)"
    )


def _check_model(config) -> None:
  m, chunk = config.model, config.train.loss_chunk
  if m.d_model % m.n_head:
    raise UserError(
      f"config.model.d_model={m.d_model} is not divisible by config.model.n_head={m.n_head}; "
      "pick a d_model that is a multiple of n_head"
    )
  if m.positions == "rope" and (m.d_model // m.n_head) % 2:
    raise UserError(
      f"rope needs an even head size, got d_model/n_head={m.d_model // m.n_head}; change "
      "d_model or n_head"
    )
  if chunk and m.block_size % chunk:
    raise UserError(
      f"config.train.loss_chunk={chunk} must be 0 (off) or divide config.model.block_size="
      f"{m.block_size}; e.g. --config.train.loss_chunk={_largest_divisor(m.block_size, 256)}"
    )


def _check_training(config) -> None:
  t, o = config.train, config.optim
  if config.cpu_devices == 0 or config.cpu_devices < -1:
    raise UserError(
      f"config.cpu_devices={config.cpu_devices} must be -1 (one per core) or at least 1"
    )
  if o.lr <= 0:
    raise UserError(f"config.optim.lr={o.lr} must be above 0")
  if t.batch_size % o.grad_accum:
    raise UserError(
      f"config.train.batch_size={t.batch_size} is not divisible by "
      f"config.optim.grad_accum={o.grad_accum}"
    )


def _check_data(config) -> None:
  d = config.data
  if d.source in ("text", "task") and not d.path:
    raise UserError(
      f"config.data.source='{d.source}' needs --config.data.path=FILE_OR_GLOB"
      + (" (JSONL conversations)" if d.source == "task" else "")
    )
  if d.source in ("text", "task") and not 0.0 < d.val_fraction < 1.0:
    raise UserError(f"config.data.val_fraction={d.val_fraction} must be in (0, 1)")


def _check_mesh(config) -> None:
  """Mesh sizes and rule names (whether the sizes fit the devices is make_mesh's to say)."""
  shape, dcn = config.mesh.shape, config.mesh.dcn_shape
  sizes = [int(shape[a]) for a in MESH_AXES]
  if (
    any(int(dcn[a]) < 1 for a in MESH_AXES)
    or any(n < 1 and n != -1 for n in sizes)
    or (sizes.count(-1) > 1)
  ):
    raise UserError(
      f"config.mesh.shape={dict(shape)} / dcn_shape={dict(dcn)}: sizes must be positive, "
      "with at most one -1 (fill) in mesh.shape"
    )
  for name, spec in config.mesh.rules.items():
    for axis in (a.strip() for a in spec.split(",") if a.strip()):
      if axis not in MESH_AXES:
        raise UserError(
          f"config.mesh.rules.{name}={spec!r} names mesh axis {axis!r}; mesh axes are "
          f"{', '.join(MESH_AXES)} (comma-separated, '' for replicated)"
        )


def _check_distributed(config) -> None:
  dc = config.distributed
  for key in ("timeout_s", "heartbeat_timeout_s"):
    if dc[key] <= 0:
      raise UserError(f"config.distributed.{key}={dc[key]} must be above 0")
  if not dc.coordinator_address:
    return
  missing = [k for k in ("num_processes", "process_id") if dc[k] is None]
  if missing:
    raise UserError(
      f"config.distributed.coordinator_address is set but "
      f"{', '.join('config.distributed.' + k for k in missing)} is not; pass "
      "all three (the same address and count on every process)"
    )
  if not 0 <= dc.process_id < dc.num_processes:
    raise UserError(
      f"config.distributed.process_id={dc.process_id} must be in "
      f"[0, num_processes={dc.num_processes})"
    )


def upgrade(saved: dict) -> config_dict.ConfigDict:
  """A config.json saved by an older gptjax, with today's keys: every key it lacks takes
  today's default, which is what the code did before the key existed (a new key's default
  must keep old behaviour). Keys gptjax no longer knows are dropped."""

  def merge(defaults: dict, old: dict) -> dict:
    return {
      k: merge(v, old.get(k) or {}) if isinstance(v, dict) else old.get(k, v)
      for k, v in defaults.items()
    }

  return config_dict.ConfigDict(merge(default_config().to_dict(), saved))


def load_saved(directory: str) -> config_dict.ConfigDict:
  """The config a run in `directory` (a workdir or an export) was trained with, upgraded."""
  path = storage.join(directory, "config.json")
  try:
    return upgrade(storage.read_json(path))
  except FileNotFoundError:
    raise UserError(
      f"{path} not found: {directory} holds no training run; pass the --workdir of a run"
    ) from None


# What a fine-tuning run takes from the run it starts from (init_from): its shape and vocabulary.
SOURCE_KEYS = (
  "model.n_layer", "model.n_head", "model.d_model", "model.d_ff", "model.vocab_size",
  "model.norm", "model.positions", "model.activation", "model.tie_embeddings", "model.bias",
  "model.rope_theta", "model.vocab_multiple", "data.tokenizer",
)  # fmt: skip


def adopt(config, source) -> list[str]:
  """Sets config's SOURCE_KEYS (and block_size with learned positions, which fix it) to the
  source run's config where config leaves them at their defaults; returns what changed, as
  'key a -> b'. A key set to something else (by the experiment or a flag) is a UserError:
  the weights cannot take it, and silently replacing a user's choice would hide that."""
  keys = SOURCE_KEYS + (("model.block_size",) if source.model.positions == "learned" else ())
  defaults = default_config()
  differ = [
    (section, leaf, config[section][leaf], source[section][leaf])
    for section, leaf in (key.split(".") for key in keys)
    if config[section][leaf] != source[section][leaf]
  ]
  conflicts = [
    f"--config.{section}.{leaf}={new} (not {old})"
    for section, leaf, old, new in differ
    if old != defaults[section][leaf]
  ]
  if conflicts:
    raise UserError(
      f"config.init_from={config.init_from} is a run whose weights fix these: pass "
      f"{' '.join(conflicts)}, or start from another run"
    )
  for section, leaf, _, new in differ:
    config[section][leaf] = new
  return [f"{section}.{leaf} {old} -> {new}" for section, leaf, old, new in differ]


def fixed_vocab_size(config) -> int | None:
  """The vocabulary size when no data can change it: byte's, or GPT-2 BPE's without a file of
  its own (a char or SentencePiece vocabulary, or a BPE file, must be read)."""
  if config.data.tokenizer_path or config.init_from:
    return None
  return {"byte": 257, "bpe": 50257}.get(config.data.tokenizer)


def leaves(node, prefix: str = ""):
  """(dotted key, value) of every leaf of a ConfigDict (or of its JSON, a dict)."""
  for key, value in node.items():
    if isinstance(value, (config_dict.ConfigDict, dict)):
      yield from leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def resolved(config: config_dict.ConfigDict, vocab_size: int) -> dict:
  """The config as plain JSON data, the vocabulary size resolved (WORKDIR/config.json)."""
  out = config.copy_and_resolve_references()
  with out.unlocked():
    out.model.vocab_size = vocab_size
  return json.loads(out.to_json_best_effort())

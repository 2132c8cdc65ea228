"""Benchmarks (figures, not tests): `python -m gptjax.bench WHAT --config=... [--config.k=v]`.

  checkpoint  save (blocking part and total) and restore time, and size on disk, of the full
              train state (params + Adam; random, as after training) of the configured model.

  decode      prefill and greedy generation with random weights on one device: a batch
              of --decode_batch random prompts of --prompt_len tokens, --new_tokens each;
              medians over --repeats runs after a compiling run (--batch_size: deprecated).
  sample      `--mode=sample`'s path on a trained run (--workdir, no --config): batch 1,
              --new_tokens (500) from end-of-text, temperature 0.8, top_k 200, past the
              context window as needed; median of --repeats after a compiling run.

  train       the real jitted train step (optimizer update included) on synthetic batches
              (random tokens), on the configured mesh: compile time, then --warmup steps
              untimed, then --steps steps each synchronised (median / min / max step time),
              then the same number back to back with one sync at the end (as the training
              loop runs). Tokens/s, model FLOPs per token and MFU as in gptjax/metrics.py.

Each prints one JSON line. The vocabulary is config.model.vocab_size, else the tokenizer's
when it is fixed (byte 257, bpe 50257), else 50257 with a note saying so: no dataset is read.
"""

import json
import sys
import tempfile
import time
import uuid

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags

from gptjax import (
  checkpoint,
  cli,
  decode,
  inference,
  metrics,
  packing,
  quantize,
  runtime,
  serve_bench,
  sharding,
  storage,
  train,
)
from gptjax import config as config_lib
from gptjax.errors import UserError
from gptjax.model import GPTConfig, count_params

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Scratch directory (default: a temporary one).")
_DECODE_BATCH = flags.DEFINE_integer("decode_batch", 1, "decode: prompts per batch.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "decode: the old --decode_batch.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 64, "decode, serve: tokens per prompt.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 256, "decode, sample, serve: tokens per prompt.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "decode, sample: timed runs (their median).")
_STEPS = flags.DEFINE_integer("steps", 20, "train: timed steps.")
_CLIENTS = flags.DEFINE_integer("clients", 8, "serve: concurrent clients (closed loop).")
_REQUESTS = flags.DEFINE_integer("requests", 32, "serve: requests in all.")
_RATE = flags.DEFINE_float("rate", None, "serve: Poisson arrivals per second (else closed loop).")
_SLOTS = flags.DEFINE_integer("slots", 32, "serve: the server's decode slots.")
_LIMIT = flags.DEFINE_float("time_limit", 600, "serve: seconds after which no request starts.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "train: untimed steps after compiling.")
_QUANTIZE = flags.DEFINE_string("quantize", "none", "decode, serve: int8 weights.")
_KV_QUANT = flags.DEFINE_string("kv_quant", "none", "decode, serve: an int8 KV cache.")
# Flags that some benchmarks read: each help begins with their names ("decode, serve: ").
_PER_BENCH = (_DECODE_BATCH, _BATCH_SIZE, _PROMPT_LEN, _NEW_TOKENS, _REPEATS, _STEPS, _CLIENTS)
_PER_BENCH += (_REQUESTS, _RATE, _SLOTS, _LIMIT, _WARMUP, _QUANTIZE, _KV_QUANT)


def _trained_looking(state, shardings):
  """Adam's moments start at zero, which compresses to nothing: fill them with noise so the
  size and write time are those of a state after training."""

  def fill(opt_state):
    leaves, treedef = jax.tree.flatten(opt_state)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    return treedef.unflatten(
      [jax.random.normal(k, x.shape, x.dtype) * 1e-3 if x.ndim else x for k, x in zip(keys, leaves)]
    )

  return jax.jit(
    lambda st: st.replace(opt_state=fill(st.opt_state)), out_shardings=shardings, donate_argnums=0
  )(state)


def _check_flags(bench: str) -> None:
  """A flag that only other benchmarks read is refused; --batch_size is the old spelling of
  --decode_batch: a warning, or an error if both."""
  for holder in _PER_BENCH:
    readers = flags.FLAGS[holder.name].help.split(":")[0]
    if holder.present and bench not in readers.split(", "):
      batch = f"; bench {bench} takes its batch from --config.train.batch_size"
      raise UserError(f"--{holder.name} is for bench {readers}{batch * ('batch' in holder.name)}")
  if bench != "decode" or not _BATCH_SIZE.present:
    return
  if _DECODE_BATCH.present:
    raise UserError(
      "--batch_size and --decode_batch both given; --batch_size is the deprecated spelling "
      "of --decode_batch: pass only --decode_batch"
    )
  print("gptjax.bench: warning: --batch_size is deprecated; use --decode_batch", file=sys.stderr)


def _decode_batch() -> int:
  return _BATCH_SIZE.value if _BATCH_SIZE.present else _DECODE_BATCH.value


def _vocab(config) -> int:
  """The vocabulary to time: the config's, else the tokenizer's when fixed, else GPT-2's
  (said on stderr: a char or SentencePiece vocabulary depends on files not read here)."""
  fixed = config.model.vocab_size or config_lib.fixed_vocab_size(config)
  if fixed:
    return fixed
  print(
    f"gptjax.bench: timing a 50257-token vocabulary (GPT-2's): the {config.data.tokenizer} "
    "tokenizer's size comes from data; pass --config.model.vocab_size=N for the model's own",
    file=sys.stderr,
  )
  return 50257


def _synthetic_batches(s, vocab_size: int, task: bool) -> list:
  """A few different batches of random tokens (not one repeated): the step never sees the
  same input twice in a row, as in training. Transfers happen here, outside the timed loop.
  task: packed rows of random examples (a quarter to a whole row long, half of each trained),
  with their segments, positions and weights, as fine-tuning runs them."""
  rows, rng = s.rows(), np.random.default_rng(0)
  n_rows, width = len(range(*rows.indices(s.batch_shape[0]))), s.batch_shape[1]
  if not task:
    return [s.batch(rng.integers(0, vocab_size, (n_rows, width), dtype=np.int32)) for _ in range(4)]
  out = []
  for _ in range(4):
    examples = []
    while sum(len(ids) for ids, _ in examples) < 1.2 * n_rows * width:
      n = int(rng.integers(width // 4, width + 1))
      weights = (np.arange(n) >= n // 2).astype(np.float32)
      examples.append((rng.integers(0, vocab_size, n, dtype=np.int32), weights))
    p = packing.pack(examples, width - 1)
    fields = dict(tokens=p.tokens, weights=p.weights, segments=p.segments, positions=p.positions)
    out.append(s.batch({k: np.resize(v, (n_rows, *v.shape[1:])) for k, v in fields.items()}))
  return out


def _time_steps(s, state, batches):
  """--warmup untimed steps, then --steps each synchronised, then --steps back to back with
  one sync at the end. Returns the synchronised step times, the mean back-to-back step time
  and the last step's metrics."""
  for i in range(_WARMUP.value):
    state, m = s.train_step(state, batches[i % 4])
  jax.block_until_ready(state)
  times = []
  for i in range(_STEPS.value):
    t0 = time.perf_counter()
    state, m = s.train_step(state, batches[i % 4])
    jax.block_until_ready((state, m))
    times.append(time.perf_counter() - t0)
  t0 = time.perf_counter()
  for i in range(_STEPS.value):
    state, m = s.train_step(state, batches[i % 4])
  jax.block_until_ready(state)
  return times, (time.perf_counter() - t0) / _STEPS.value, m


def _peak_bytes(device):
  try:
    return (device.memory_stats() or {}).get("peak_bytes_in_use")
  except Exception:  # not every backend has allocator statistics
    return None


def bench_train(config, workdir: str) -> dict:
  del workdir

  if _STEPS.value < 1 or _WARMUP.value < 0:
    raise UserError("--steps must be >= 1 and --warmup >= 0")
  config_lib.validate(config)
  mesh = runtime.start(config)
  vocab = _vocab(config)
  s = train.setup(config, vocab, mesh)
  metrics.check_fits(s.memory(), config)
  cfg = s.model.cfg
  state = s.init(config.seed)
  batches = _synthetic_batches(s, cfg.vocab_size, config.data.source == "task")
  times, pipelined_s, m = _time_steps(s, state, batches)
  if not np.isfinite(float(m["loss"])):
    raise UserError(f"the benchmarked step gave loss {float(m['loss'])}; check the config")
  tokens = config.train.batch_size * cfg.block_size
  median = float(np.median(times))
  device = jax.devices()[0]
  speed = metrics.throughput(tokens / median, cfg, jax.device_count(), device.device_kind)
  peak = _peak_bytes(device)
  mem = s.memory()
  return {
    "bench": "train",
    "device": device.device_kind,
    "devices": jax.device_count(),
    "mesh": dict(mesh.shape),
    "n_params": count_params(s.abstract.params),
    "dtype": jnp.dtype(cfg.dtype).name,
    "batch": config.train.batch_size,
    "seq_len": cfg.block_size,
    "vocab_size": cfg.vocab_size,
    "grad_accum": config.optim.grad_accum,
    "tokens_per_step": tokens,
    "tokens_per_s": round(tokens / median, 1),
    "tokens_per_s_pipelined": round(tokens / pipelined_s, 1),
    "step_ms_median": round(1e3 * median, 3),
    "step_ms_min": round(1e3 * min(times), 3),
    "step_ms_max": round(1e3 * max(times), 3),
    "step_ms_pipelined": round(1e3 * pipelined_s, 3),
    "flops_per_token": metrics.flops_per_token(cfg),
    "tflops": round(speed["tflops"], 4),
    "tflops_per_device": round(speed["tflops_per_device"], 4),
    "peak_tflops_per_device": metrics.peak_tflops(device.device_kind),
    "mfu": None if speed["mfu"] is None else round(speed["mfu"], 4),
    "compile_s": round(s.compile_s, 2),
    "peak_memory_bytes": peak,
    "memory_estimate_bytes": mem.get("peak_estimate"),
    "steps": _STEPS.value,
    "warmup": _WARMUP.value,
  }


def bench_checkpoint(config, workdir: str) -> dict:
  """In a directory of its own under workdir (the disk or bucket), removed after."""
  config_lib.validate(config)
  mesh = sharding.make_mesh(config.mesh)
  s = train.setup(config, _vocab(config), mesh, compile=False)
  state = jax.block_until_ready(_trained_looking(s.init(config.seed), s.state_shardings))
  scratch = storage.join(storage.absolute(workdir), f"bench-checkpoint-{uuid.uuid4().hex[:8]}")
  try:
    return _time_checkpoint(config, scratch, s, state, mesh)
  finally:
    storage.rmtree(scratch)


def _time_checkpoint(config, workdir: str, s, state, mesh) -> dict:  # what it writes, timed
  ckpt = checkpoint.Checkpoints(workdir, config.checkpoint)
  t0 = time.perf_counter()
  ckpt.save(state, {"step": 0})
  blocking = time.perf_counter() - t0
  ckpt.wait()
  total = time.perf_counter() - t0
  size = storage.size(storage.join(workdir, checkpoint.CHECKPOINTS, "0"))
  t0 = time.perf_counter()
  restored, _ = checkpoint.Checkpoints(workdir).restore(s.abstract, s.state_shardings)
  jax.block_until_ready(restored)
  restore = time.perf_counter() - t0
  ckpt.close()
  n = sum(x.size for x in jax.tree.leaves(state.params))
  return {
    "bench": "checkpoint",
    "n_params": int(n),
    "devices": jax.device_count(),
    "mesh": dict(mesh.shape),
    "async": bool(config.checkpoint.async_save),
    "save_blocking_s": round(blocking, 3),
    "save_total_s": round(total, 3),
    "restore_s": round(restore, 3),
    "bytes": size,
    "gib": round(size / 2**30, 3),
    "write_gib_per_s": round(size / 2**30 / total, 3),
  }


def bench_decode(config, workdir: str) -> dict:
  """Times prefill and the generate loop separately; tokens/s counts new tokens only."""
  del workdir
  config_lib.validate(config)
  cfg = GPTConfig.from_config(config.model, _vocab(config))
  b, p, n = _decode_batch(), _PROMPT_LEN.value, _NEW_TOKENS.value
  if min(b, p, n, _REPEATS.value) < 1:
    raise UserError("--decode_batch, --prompt_len, --new_tokens and --repeats must be >= 1")
  if p + n > cfg.block_size:
    raise UserError(
      f"--prompt_len={p} + --new_tokens={n} exceeds the {cfg.block_size}-token context"
    )
  quant = quantize.Quant(_QUANTIZE.value, _KV_QUANT.value)
  device = jax.local_devices()[0]
  with jax.default_device(device):
    config = config.copy_and_resolve_references()
    config.model.vocab_size = cfg.vocab_size
    loaded = inference.quantized(serve_bench.random_weights(config), quant)  # as training starts
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (b, p), dtype=np.int32)
    start, cache_bytes = np.zeros((b,), np.int32), []
    decoder, greedy = decode.Decoder(loaded.model, loaded.params), decode.Sampling(0.0)

    def run():
      t0 = time.perf_counter()
      state = jax.block_until_ready(decoder.prefill(tokens, start, n))
      t1 = time.perf_counter()
      cache_bytes.append(sum(x.nbytes for x in jax.tree.leaves(state.cache)))
      _, out, count = jax.block_until_ready(decoder.generate(state, n, greedy))
      t2 = time.perf_counter()
      assert int(np.min(count)) == n  # no stop tokens: every row ran the whole budget
      return t1 - t0, t2 - t1

    t0 = time.perf_counter()
    run()
    compile_s = time.perf_counter() - t0
    times = np.array([run() for _ in range(_REPEATS.value)])
  prefill_s, generate_s = np.median(times[:, 0]), np.median(times[:, 1])
  return {
    "bench": "decode",
    "device": device.device_kind,
    "n_params": int(sum(x.size for x in jax.tree.leaves(loaded.params))),
    "dtype": jnp.dtype(cfg.dtype).name,
    "quantize": quant.weights,
    "kv_quant": quant.kv,
    "param_bytes": int(sum(x.nbytes for x in jax.tree.leaves(loaded.params))),
    "cache_bytes_per_row": cache_bytes[-1] // b,  # prompt + new tokens of KV per sequence
    "batch": b,
    "prompt_len": p,
    "new_tokens": n,
    "greedy": True,
    "tokens_per_s": round(b * n / (prefill_s + generate_s), 1),
    "decode_tokens_per_s": round(b * n / generate_s, 1),
    "ms_per_step": round(1e3 * generate_s / n, 3),
    "prefill_ms": round(1e3 * prefill_s, 2),
    "first_run_s": round(compile_s, 2),
    "repeats": _REPEATS.value,
  }


def bench_sample(config, workdir: str) -> dict:
  del config

  if not _WORKDIR.value:
    raise UserError("bench sample needs --workdir=DIR of a trained run")
  run = inference.load(workdir)
  model, params, tokenizer, where = run.model, run.params, run.tokenizer, run.where
  decoder = decode.Decoder(model, params, stop_tokens=[tokenizer.eot_id])
  sampling = decode.Sampling(0.8, 200, 1.0)
  n = _NEW_TOKENS.value if flags.FLAGS["new_tokens"].present else 500
  runs = []
  for seed in range(_REPEATS.value + 1):
    t0 = time.perf_counter()
    out, _ = decode.complete(decoder, [[tokenizer.eot_id]], n, sampling, seed)
    runs.append((len(out[0]), time.perf_counter() - t0))
  rates = [k / s for k, s in runs[1:]]
  return {
    "bench": "sample",
    "from": where,
    "block_size": model.cfg.block_size,
    "new_tokens": n,
    "tokens_per_s": round(float(np.median(rates)), 1),
    "tokens_per_s_min": round(min(rates), 1),
    "tokens_per_s_max": round(max(rates), 1),
    "first_run_s": round(runs[0][1], 2),
    "repeats": _REPEATS.value,
  }


def bench_serve(config, workdir: str) -> dict:
  """The HTTP server with random weights of config's shape under load (serve_bench.py);
  prompt_len random tokens in, new_tokens out, greedy, as bench decode times offline."""
  del workdir
  p, n = _PROMPT_LEN.value, _NEW_TOKENS.value
  vocab = _vocab(config)
  if p + n > config.model.block_size:
    raise UserError(f"--prompt_len={p} + --new_tokens={n} exceeds the context")
  overrides = [a for a in sys.argv if a.startswith("--config")]
  args = [*overrides, f"--config.model.vocab_size={vocab}", "--random_weights"]
  args += [f"--quantize={_QUANTIZE.value}", f"--kv_quant={_KV_QUANT.value}"]
  proc, url = serve_bench.start_server([*args, f"--slots={_SLOTS.value}", "--chunk=8"])
  try:
    prompt = np.random.default_rng(0).integers(0, vocab, p).tolist()
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True}
    body["stream_options"] = {"include_usage": True}
    figures = serve_bench.measure(
      url, body, _CLIENTS.value, _REQUESTS.value, _RATE.value, _LIMIT.value
    )
  finally:
    serve_bench.stop_server(proc)
  return {"bench": "serve", "slots": _SLOTS.value, "prompt_len": p, "new_tokens": n, **figures}


def main(argv):
  benches = {
    "train": bench_train,
    "checkpoint": bench_checkpoint,
    "decode": bench_decode,
    "sample": bench_sample,
    "serve": bench_serve,
  }
  if len(argv) != 2 or argv[1] not in benches:
    raise UserError(f"name one benchmark: {', '.join(benches)}")
  if _CONFIG.value is None and argv[1] != "sample":
    raise UserError("--config is required")
  _check_flags(argv[1])
  with tempfile.TemporaryDirectory() as tmp:
    print(json.dumps(benches[argv[1]](_CONFIG.value, _WORKDIR.value or tmp)))


if __name__ == "__main__":
  cli.run(main, "gptjax.bench")

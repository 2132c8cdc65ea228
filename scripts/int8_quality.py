"""int8 against float32 on a trained run, teacher-forced on the last 10% of a text file:
loss, top-1 agreement, max and mean |dlogit| (docs/BENCHMARKS.md, "int8 inference").

  python scripts/int8_quality.py WORKDIR TEXT_FILE WINDOWS
  python scripts/int8_quality.py runs/shakespeare_cpu ../shared/data/tinyshakespeare/input.txt 256

The int8-KV variants run the windows through the model's KV cache, as decoding does."""

import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import inference, quantize

workdir, text_path, windows = sys.argv[1], sys.argv[2], int(sys.argv[3])
base = inference.load(workdir)
text = open(text_path).read()
val = text[int(len(text) * 0.9) :]
ids = base.tokenizer.encode(val)
T = base.model.cfg.block_size
starts = np.linspace(0, len(ids) - T - 1, windows).astype(int)
batch = np.stack([ids[s : s + T] for s in starts]).astype(np.int32)  # (W, T)


def forward_plain(run):
  return jax.jit(lambda p, t: run.model.apply({"params": p}, t))


def forward_cached(run):
  @jax.jit
  def f(p, t):
    start = jnp.zeros((t.shape[0],), jnp.int32)
    shapes = jax.eval_shape(
      functools.partial(run.model.init, start_B=start), jax.random.PRNGKey(0), t
    )["cache"]
    cache = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
    pos = jnp.broadcast_to(jnp.arange(t.shape[1]), t.shape)
    return run.model.apply({"params": p, "cache": cache}, t, pos, start_B=start, mutable=["cache"])[
      0
    ]

  return f


def logits_of(run, fwd):
  # one window per call: T rows, 64 for :cpu (at most int8_kernel.MAX_ROWS), so on a CPU int8
  # weights take the int8 kernel's path, as decoding does, rather than XLA's dot; the int8-KV
  # variants write all T tokens at once (a prefill), not one decoding step at a time
  f = fwd(run)
  return np.concatenate(
    [np.asarray(f(run.params, batch[i : i + 1]), np.float64) for i in range(len(batch))]
  )


def loss(logits):
  lp = jax.nn.log_softmax(jnp.asarray(logits[:, :-1]), axis=-1)
  return float(-np.mean(np.take_along_axis(np.asarray(lp), batch[:, 1:, None], axis=-1)))


ref = logits_of(base, forward_plain)
ref_cached = logits_of(base, forward_cached)
out = {
  "windows": windows,
  "tokens": int(batch.size),
  "loss_fp32": loss(ref),
  "loss_fp32_cached_path": loss(ref_cached),
}
for name, quant, fwd in (
  ("int8_weights", quantize.Quant("int8"), forward_plain),
  ("int8_kv", quantize.Quant("none", "int8"), forward_cached),
  ("int8_weights_kv", quantize.Quant("int8", "int8"), forward_cached),
):
  got = logits_of(inference.quantized(base, quant), fwd)
  v = base.model.cfg.vocab_size
  d = np.abs(got[..., :v] - ref[..., :v])
  out[name] = {
    "loss": loss(got),
    "loss_rise_pct": 100 * (loss(got) / loss(ref) - 1),
    "top1_agreement": float(np.mean(got.argmax(-1) == ref.argmax(-1))),
    "max_abs_dlogit": float(d.max()),
    "mean_abs_dlogit": float(d.mean()),
  }
print(json.dumps(out, indent=1))

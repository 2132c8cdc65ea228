"""Metric sinks (WORKDIR/metrics.jsonl, TensorBoard events, the console), model FLOPs / MFU,
and per-device memory (what a compiled step needs, and whether it fits).

Only the process that owns the logs (process 0 on several hosts) writes; the others get a
writer that drops everything, so the training loop never branches on the process index.

Model FLOPs per trained token (forward + backward = 3x forward, a multiply-add is 2 FLOPs):

    6 * N  +  12 * n_layer * T * d_model

N counts the weights that take part in matmuls: per layer q, k, v and the output projection
(4 d^2) and the MLP (2 d d_ff, SwiGLU 3 d d_ff), plus the output head with the *real*
vocabulary (V d; padding rows are a speed device, not model work). Embedding lookups, biases
and norms are not matmuls and are left out. The attention term is QK^T and AV over the whole
T x T square (2 * 2 T d per token per layer forward), as PaLM and nanoGPT count it: a causal
kernel that skips the upper half reports the same model FLOPs, so MFU stays comparable.
T is the training sequence length (block_size). MFU = achieved model FLOP/s per device over
the device's peak dense bf16 FLOP/s (PEAK_TFLOPS; none for CPUs).
"""

import contextlib
import json
import math
import os
import sys
import time

import jax
import numpy as np

from gptjax import storage
from gptjax.errors import UserError, describe, out_of_memory_fix

# Dense (no sparsity) bf16 peak TFLOP/s per device, from the vendors' data sheets. Matched
# against jax's device_kind in order, first match wins (PCIe before plain H100).
PEAK_TFLOPS = (
  ("H100 PCIe", 756.0),
  ("H100", 989.0),  # SXM5
  ("H200", 989.0),
  ("A100", 312.0),
  ("TPU v4", 275.0),
  ("TPU v5 lite", 197.0),  # v5e
  ("TPU v5e", 197.0),
  ("TPU v5p", 459.0),
  ("TPU v5", 459.0),  # v5p reports itself as "TPU v5"
  ("TPU v6 lite", 918.0),  # v6e (Trillium)
  ("TPU v6e", 918.0),
)


def peak_tflops(device_kind: str) -> float | None:
  """The table's peak for a jax device_kind, or None (CPUs, unknown chips: no MFU)."""
  for name, tflops in PEAK_TFLOPS:
    if name.lower() in device_kind.lower():
      return tflops
  return None


def flops_per_token(cfg) -> float:
  """Model FLOPs per trained token of a GPTConfig (the formula in this module's docstring)."""
  d, ff = cfg.d_model, cfg.d_ff
  mlp = (3 if cfg.activation == "swiglu" else 2) * d * ff
  n_matmul = cfg.n_layer * (4 * d * d + mlp) + cfg.vocab_size * d
  return 6.0 * n_matmul + 12.0 * cfg.n_layer * cfg.block_size * d


def throughput(tokens_per_s: float, cfg, devices: int, device_kind: str) -> dict:
  """Model TFLOP/s (all devices) and MFU (None without a known peak) at tokens_per_s."""
  tflops = tokens_per_s * flops_per_token(cfg) / 1e12
  peak = peak_tflops(device_kind)
  return {
    "tflops": tflops,
    "tflops_per_device": tflops / devices,
    "mfu": tflops / devices / peak if peak else None,
  }


class MetricWriter:
  """Appends `{"step": s, **scalars}` lines to metrics.jsonl and mirrors them to TensorBoard.

  Locally each line is appended and flushed as it is logged. A bucket has no append: there
  the file is rewritten whole from the lines held here, at most every UPLOAD_S seconds and
  at every flush() (before each checkpoint, so a resume finds every line up to it) and
  close()."""

  UPLOAD_S = 30.0

  def __init__(self, workdir: str, enabled: bool = True, resume_step: int | None = None):
    """resume_step: a run resumed from that step; lines logged after it are dropped (the
    resumed run logs those steps again), so the files read as one uninterrupted run."""
    self.enabled = enabled
    self._jsonl = self._tb = None
    self.path = storage.join(workdir, "metrics.jsonl")
    self._lines, self._uploaded = None, 0.0
    if enabled:
      SummaryWriter = _summary_writer_class()

      remote = storage.is_url(self.path)
      kept = _kept_lines(self.path, resume_step) if remote or resume_step is not None else []
      if remote:
        self._lines = kept
        self._upload()
      else:
        if resume_step is not None:
          storage.write_text(self.path, "".join(kept))
        self._jsonl = open(self.path, "a")
      self._tb = SummaryWriter(
        logdir=workdir, flush_secs=30, purge_step=None if resume_step is None else resume_step + 1
      )

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    clean = {k: _finite_or_str(v) for k, v in scalars.items()}
    line = json.dumps({"step": int(step), **clean}) + "\n"
    try:
      if self._lines is not None:
        self._lines.append(line)
        if time.monotonic() - self._uploaded >= self.UPLOAD_S:
          self._upload()
      else:
        self._jsonl.write(line)
        self._jsonl.flush()  # a killed run keeps every line it logged
    except OSError as e:
      raise UserError(
        f"cannot write {self.path} ({e.strerror}); free some space or use another --workdir"
      ) from None
    for name, value in clean.items():
      if isinstance(value, (int, float)):
        self._tb.add_scalar(name, value, int(step))

  def _upload(self) -> None:
    try:
      storage.write_text(self.path, "".join(self._lines))
    except Exception as e:  # gcsfs's HttpError is no OSError
      raise UserError(f"cannot write {self.path} ({describe(e)}); check the bucket") from None
    self._uploaded = time.monotonic()

  def flush(self) -> None:
    """Every line logged so far is in the workdir (a no-op locally: lines are flushed)."""
    if self.enabled and self._lines is not None:
      self._upload()

  def close(self) -> None:
    """Closes both files; on a full disk the last lines are lost, not the exit's message."""
    if self.enabled:
      closes = (self._jsonl.close if self._jsonl else self.flush, self._tb.close)
      for close in closes:
        try:
          close()
        except (OSError, UserError):
          pass
      writer = getattr(self._tb, "file_writer", None)
      if writer is not None:  # else tensorboardX's atexit hook retries the failed flush
        writer.event_writer._closed = True


def _summary_writer_class():
  """tensorboardX's SummaryWriter (no TensorFlow import), imported without torch: its writer
  module imports torch when installed, only to accept torch tensors, which gptjax never
  passes, and that import added ~1.6 s to every training run's start. A None entry in
  sys.modules makes that `import torch` fail fast; torch itself stays importable after."""
  if "torch" in sys.modules or "tensorboardX.writer" in sys.modules:
    from tensorboardX import SummaryWriter

    return SummaryWriter
  sys.modules["torch"] = None
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules["torch"]
  return SummaryWriter


def _finite_or_str(v):
  v = float(v) if not isinstance(v, int) else v
  return v if not isinstance(v, float) or math.isfinite(v) else str(v)  # JSON has no NaN


def console(line: str, enabled: bool = True) -> None:
  if enabled:
    print(line, file=sys.stdout, flush=True)


def format_duration(seconds: float) -> str:
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def progress_line(
  step: int,
  total: int,
  loss: float,
  tokens_per_sec: float,
  eta_s: float,
  lr: float,
  mfu: float | None = None,
) -> str:
  width = len(str(total))
  return (
    f"step {step:>{width}}/{total} | loss {loss:.4f} | lr {lr:.2e} | "
    f"{tokens_per_sec / 1e3:.1f}k tok/s"
    + (f" | MFU {mfu:.1%}" if mfu is not None else "")
    + f" | ETA {format_duration(eta_s)}"
  )


def read_summary(workdir: str, step: int) -> dict | None:
  """The run's summary.json if it is whole and of `step` (not an earlier, shorter run's)."""
  path = storage.join(workdir, "summary.json")
  try:
    summary = storage.read_json(path) if storage.exists(path) else {}
  except UserError:  # cut short by a kill
    return None
  return summary if summary.get("steps") == step else None


def set_aside(workdir: str) -> str | None:
  """A run starting at step 0 where metrics.jsonl exists (an attempt killed before its first
  checkpoint) moves it aside, lest its steps repeat in the new run's file; says where."""
  path = storage.join(workdir, "metrics.jsonl")
  if not storage.exists(path):
    return None
  aside = storage.join(workdir, time.strftime("metrics.%Y%m%d-%H%M%S.unsaved.jsonl"))
  storage.move(path, aside)
  return f"the earlier attempt's metrics moved to {aside}"


def _kept_lines(path: str, step: int | None) -> list[str]:
  """The file's lines of steps <= step (all of them when step is None), without a line cut
  short by a kill."""
  if not storage.exists(path):
    return []
  keep = []
  for line in storage.read_text(path).splitlines():
    try:
      if step is None or json.loads(line)["step"] <= step:
        keep.append(line + "\n")
    except (ValueError, KeyError):
      continue
  return keep


class Timer:
  """Training time: per-step milliseconds between log lines, with evals and checkpoint
  copies left out (pause()), and the run's elapsed time across resumes."""

  def __init__(self, step: int, elapsed_before_s: float):
    self.start = self.mark = time.perf_counter()
    self.mark_step, self.paused, self.before = step, 0.0, elapsed_before_s

  def elapsed_s(self, now: float | None = None) -> float:
    return self.before + (time.perf_counter() if now is None else now) - self.start

  def lap_ms(self, step: int, now: float) -> float:
    """Mean ms per step since the last lap, pauses excluded."""
    ms = (now - self.mark - self.paused) * 1e3 / (step - self.mark_step)
    self.mark, self.mark_step, self.paused = now, step, 0.0
    return ms

  @contextlib.contextmanager
  def pause(self):
    t0 = time.perf_counter()
    try:
      yield
    finally:
      self.paused += time.perf_counter() - t0


# --- Per-device memory: what a compiled step needs, and whether it fits -----------------


def per_device_bytes(abstract_tree, shardings) -> int:
  """Bytes one device holds of a pytree laid out by `shardings`."""
  total = 0
  for leaf, s in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)):
    total += math.prod(s.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
  return total


def memory_report(abstract_state, state_shardings, compiled) -> dict:
  """Per-device bytes: parameters, optimizer state, and the compiled step's temporaries."""
  report = {
    "params": per_device_bytes(abstract_state.params, state_shardings.params),
    "opt_state": per_device_bytes(abstract_state.opt_state, state_shardings.opt_state),
  }
  try:
    stats = compiled.memory_analysis()
  except Exception:  # not every backend implements it
    stats = None
  if stats is not None:
    report["temp"] = int(stats.temp_size_in_bytes)
    report["arguments"] = int(stats.argument_size_in_bytes)
    report["outputs"] = int(stats.output_size_in_bytes)
    report["aliased"] = int(stats.alias_size_in_bytes)
    # Donated state aliases the outputs, so the peak is arguments + temporaries + new outputs.
    report["peak_estimate"] = (
      report["arguments"] + report["temp"] + report["outputs"] - report["aliased"]
    )
  return report


def device_memory_limit() -> tuple[int | None, str]:
  """Bytes one device may use, and where the figure comes from (None if unknown).

  GPUs/TPUs report their allocator's limit. Simulated CPU devices share the host's RAM.
  """
  device = jax.local_devices()[0]
  try:
    stats = device.memory_stats() or {}
  except Exception:
    stats = {}
  if stats.get("bytes_limit"):
    return int(stats["bytes_limit"]), f"{device.device_kind} memory"
  if device.platform == "cpu":
    try:
      ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
      return None, ""
    n = jax.local_device_count()
    return ram // n, f"host RAM / {n} CPU device(s)"
  return None, ""


def slow_run_note(eta_s: float) -> str:
  """What to say when a run sized for a GPU starts on a CPU (the default experiment would
  take most of a day)."""
  return (
    f"warning: at this speed the run needs {format_duration(eta_s)} more on this CPU; a CPU "
    "run wants a CPU-sized experiment, e.g. experiments/shakespeare_char.py:cpu (~2 min), "
    "or fewer --config.train.num_steps"
  )


def check_fits(report: dict, config=None) -> None:
  """Raises UserError when the compiled step's peak estimate exceeds a device's memory,
  naming the switches that would shrink it (those `config` does not use yet)."""
  limit, source = device_memory_limit()
  peak = report.get("peak_estimate")
  if limit and peak and peak > limit:
    raise UserError(
      f"the train step needs ~{format_bytes(peak)} per device but a device has "
      f"{format_bytes(limit)} ({source}); {out_of_memory_fix(config)}"
    )


def format_bytes(n: int) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024

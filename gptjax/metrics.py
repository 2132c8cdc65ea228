"""Metric sinks: WORKDIR/metrics.jsonl, TensorBoard events in WORKDIR, and the console.

Only the process that owns the logs (process 0 on several hosts) writes; the others get a
writer that drops everything, so the training loop never branches on the process index.
"""

import json
import math
import os
import sys


class MetricWriter:
  """Appends `{"step": s, **scalars}` lines to metrics.jsonl and mirrors them to TensorBoard."""

  def __init__(self, workdir: str, enabled: bool = True, resume_step: int | None = None):
    """resume_step: a run resumed from that step; lines logged after it are dropped (the
    resumed run logs those steps again), so the files read as one uninterrupted run."""
    self.enabled = enabled
    self._jsonl = self._tb = None
    if enabled:
      from tensorboardX import SummaryWriter  # light: no TensorFlow import
      path = os.path.join(workdir, "metrics.jsonl")
      if resume_step is not None:
        _truncate_jsonl(path, resume_step)
      self._jsonl = open(path, "a")
      self._tb = SummaryWriter(logdir=workdir, flush_secs=30,
                               purge_step=None if resume_step is None else resume_step + 1)

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    clean = {k: _finite_or_str(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
    self._jsonl.flush()  # a killed run keeps every line it logged
    for name, value in clean.items():
      if isinstance(value, (int, float)):
        self._tb.add_scalar(name, value, int(step))

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


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


def progress_line(step: int, total: int, loss: float, tokens_per_sec: float,
                  eta_s: float, lr: float) -> str:
  width = len(str(total))
  return (f"step {step:>{width}}/{total} | loss {loss:.4f} | lr {lr:.2e} | "
          f"{tokens_per_sec / 1e3:.1f}k tok/s | ETA {format_duration(eta_s)}")


def _truncate_jsonl(path: str, step: int) -> None:
  """Keeps the lines of steps <= step (and drops a line cut short by a kill)."""
  if not os.path.exists(path):
    return
  keep = []
  with open(path) as f:
    for line in f:
      try:
        if json.loads(line)["step"] <= step:
          keep.append(line if line.endswith("\n") else line + "\n")
      except (ValueError, KeyError):
        continue
  with open(path + ".tmp", "w") as f:
    f.writelines(keep)
  os.replace(path + ".tmp", path)

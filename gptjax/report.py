"""Compare a sweep's variants: `python -m gptjax.report runs/X`.

Reads each variant's metrics.jsonl (and summary.json, config.json when the run finished),
writes runs/X/report.md (a table) and runs/X/val_loss.png (val loss against step, one line
per variant), and prints the table.
"""

import json
import math
import os

from gptjax import cli, storage, sweep
from gptjax.errors import UserError


def _read_jsonl(path: str) -> list[dict]:
  """A run's metrics; a last line cut short by a kill is left out, as a resume leaves it."""
  lines = [line for line in storage.read_text(path).splitlines() if line.strip()]
  rows = []
  for i, line in enumerate(lines):
    try:
      rows.append(json.loads(line))
    except ValueError:
      if i < len(lines) - 1:
        raise UserError(f"{path} line {i + 1} is not JSON; restore the file or rerun") from None
  return rows


def collect(root: str) -> list[dict]:
  """One row per variant directory that has metrics.jsonl (in the sweep's order)."""
  if not storage.isdir(root):
    raise UserError(
      f"{root!r} is not a directory; pass the directory a sweep ran in (its --workdir)"
    )
  record = storage.join(root, "sweep.json")
  overrides = storage.read_json(record).get("variants", {}) if storage.exists(record) else {}
  names = list(overrides) + sorted(n for n in storage.listdir(root) if n not in overrides)
  rows = []
  for name in names:
    metrics = storage.join(root, name, "metrics.jsonl")
    failure_path = storage.join(root, name, sweep.FAILED)
    if not storage.isfile(metrics) and not storage.isfile(failure_path):
      continue  # not a variant, or one that never started
    lines = _read_jsonl(metrics) if storage.isfile(metrics) else []
    train = [(m["step"], m["loss"]) for m in lines if "loss" in m]
    val = [(m["step"], m["val_loss"]) for m in lines if "val_loss" in m]
    speeds = sorted(m["tokens_per_sec"] for m in lines if "tokens_per_sec" in m)
    summary_path = storage.join(root, name, "summary.json")
    summary = storage.read_json(summary_path) if storage.exists(summary_path) else {}
    failure = storage.read_text(failure_path).strip() if storage.exists(failure_path) else None
    rows.append(
      {
        "variant": name,
        "overrides": overrides.get(name, {}),
        "params": summary.get("n_params"),
        "steps": max([s for s, _ in train + val], default=0),
        "finished": bool(summary) and not summary.get("preempted_at"),
        "failed": failure,
        "final_loss": train[-1][1] if train else None,
        "final_val_loss": val[-1][1] if val else None,
        "best_val_loss": min(v for _, v in val) if val else None,
        "tokens_per_sec": summary.get("tokens_per_sec")
        or (speeds[len(speeds) // 2] if speeds else None),
        "wall_s": summary.get("wall_s")
        or max([m.get("elapsed_s", 0) for m in lines], default=None),
        "val_curve": val,
      }
    )
  if not rows and storage.isfile(storage.join(root, "metrics.jsonl")):
    raise UserError(
      f"{root} is one run's workdir; report reads a sweep's --workdir (a directory of runs)"
    )
  if not rows:
    raise UserError(f"no variant in {root} has a metrics.jsonl yet; run the sweep first")
  return rows


def _fmt(x, spec):
  return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def table(rows: list[dict]) -> str:
  head = (
    "| variant | overrides | params | steps | final train loss | final val loss | "
    "best val loss | tokens/s | wall time |\n|---|---|---:|---:|---:|---:|---:|---:|---:|"
  )
  lines = [head]
  for r in rows:
    over = ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "(base)"
    params = _fmt(r["params"] / 1e6, ".3f") + "M" if r["params"] else "-"
    failed = (r["failed"] or "").replace("|", "\\|")  # a pipe would end the cell
    state = "" if r["finished"] else f" ({failed})" if failed else " (unfinished)"
    steps = f"{r['steps']}{state}"
    wall = _fmt(r["wall_s"], ".0f") + " s" if r["wall_s"] is not None else "-"
    lines.append(
      f"| {r['variant']} | {over} | {params} | {steps} | "
      f"{_fmt(r['final_loss'], '.4f')} | {_fmt(r['final_val_loss'], '.4f')} | "
      f"{_fmt(r['best_val_loss'], '.4f')} | {_fmt(r['tokens_per_sec'], ',.0f')} | "
      f"{wall} |"
    )
  return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str) -> None:
  import matplotlib

  matplotlib.use("Agg")  # files only, no display
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(8, 5))
  for r in rows:
    if r["val_curve"]:
      steps, losses = zip(*r["val_curve"])
      ax.plot(steps, losses, marker="o", markersize=3, label=r["variant"])
  ax.set_xlabel("step")
  ax.set_ylabel("validation loss (nats/token)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  with storage.open(path, "wb") as f:
    fig.savefig(f, format="png", dpi=120)
  plt.close(fig)


def report(root: str) -> str:
  rows = collect(root)
  text = table(rows)
  with storage.open(storage.join(root, "report.md"), "w") as f:
    f.write(
      f"# Sweep {os.path.basename(os.path.normpath(root))}\n\n{text}\n\n"
      "![validation loss](val_loss.png)\n"
    )
  plot(
    rows,
    storage.join(root, "val_loss.png"),
    f"validation loss: {os.path.basename(os.path.normpath(root))}",
  )
  return text


def main(argv) -> None:
  if len(argv) != 2 or argv[1].startswith("-"):
    raise UserError("usage: python -m gptjax.report SWEEP_DIR")
  print(report(argv[1]))
  print(f"\nwrote {storage.join(argv[1], 'report.md')} and {storage.join(argv[1], 'val_loss.png')}")


if __name__ == "__main__":
  cli.run(main, "gptjax.report")

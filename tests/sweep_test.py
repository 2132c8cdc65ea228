"""Sweeps: expansion and names, skip finished, resume interrupted, bad overrides isolated,
and the report built from each variant's metrics.jsonl."""

import importlib.util
import json
import os
import signal
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from conftest import COMPILATION_CACHE_DIR, ONE_DEVICE, REPO

from gptjax import cli, report, sweep
from gptjax.errors import UserError
from gptjax.model import GPT, GPTConfig

EXPERIMENT = """
import os, sys
sys.path.insert(0, {experiments!r})
import tiny

def get_config():
  c = tiny.get_config()
  c.train.num_steps, c.train.eval_every, c.checkpoint.every = 12, 6, 6
  return c

def get_sweep():
  return {{
    "base": {{}},
    "rms": {{"model.norm": "rmsnorm"}},
    "typo": {{"model.nrom": "x"}},
    "nodata": {{"data.path": "/nonexistent/corpus.txt"}},
  }}
"""


def _sweep(tmp_path, *args):
  return subprocess.run(
    [
      sys.executable,
      "-m",
      "gptjax.sweep",
      f"--config={tmp_path / 'exp.py'}",
      f"--workdir={tmp_path / 'runs'}",
      f"--config.compilation_cache_dir={COMPILATION_CACHE_DIR}",  # for every variant
      *args,
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=400,
    env={**os.environ, **ONE_DEVICE},
  )


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
  tmp_path = tmp_path_factory.mktemp("sweep")
  (tmp_path / "exp.py").write_text(EXPERIMENT.format(experiments=os.path.join(REPO, "experiments")))
  # "rms" was interrupted at step 6: a shorter run left a checkpoint there.
  pre = subprocess.run(
    [
      sys.executable,
      "-m",
      "gptjax.main",
      f"--config={tmp_path / 'exp.py'}",
      f"--workdir={tmp_path / 'runs' / 'rms'}",
      f"--config.compilation_cache_dir={COMPILATION_CACHE_DIR}",
      "--config.model.norm=rmsnorm",
      "--config.train.num_steps=6",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=240,
    env={**os.environ, **ONE_DEVICE},
  )
  assert pre.returncode == 0, pre.stderr[-2000:]
  return tmp_path, _sweep(tmp_path)


def test_product_names_every_combination():
  variants = sweep.product({"model.norm": ["layernorm", "rmsnorm"], "optim.lr": [1e-3, 3e-3]})
  assert list(variants) == [
    "norm=layernorm,lr=0.001",
    "norm=layernorm,lr=0.003",
    "norm=rmsnorm,lr=0.001",
    "norm=rmsnorm,lr=0.003",
  ]
  assert variants["norm=rmsnorm,lr=0.003"] == {"model.norm": "rmsnorm", "optim.lr": 3e-3}


@pytest.mark.slow
def test_the_ablation_variants_really_change_the_model():
  spec = os.path.join(REPO, "experiments", "shakespeare_ablation.py")
  variants = sweep.load_sweep(spec)
  assert list(variants) == ["baseline", "rmsnorm", "rope", "swiglu"]
  assert len(sweep.load_sweep(spec + ":product")) == 8
  sys.path.insert(0, os.path.join(REPO, "experiments"))
  import shakespeare_ablation

  base = shakespeare_ablation.get_config()
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 64), 0, 65)
  models = {
    name: GPT(GPTConfig.from_config(sweep.variant_config(base, name, overrides).model, 65))
    for name, overrides in variants.items()
  }
  init = lambda m: nn.meta.unbox(m.init(jax.random.PRNGKey(0), tokens))
  shapes = {  # {"params/h_0/mlp/up/kernel": (128, 512), ...} of each variant
    name: {
      "/".join(k.key for k in path): x.shape
      for path, x in jax.tree_util.tree_leaves_with_path(init(model))
    }
    for name, model in models.items()
  }
  base = shapes["baseline"]
  layers = [k.split("/")[1] for k in base if k.endswith("/ln_1/scale")]
  assert len(layers) == 4 and not any(k.endswith("bias") for k in base)  # nanoGPT: bias=False
  # rmsnorm: the same parameters as a bias-free layernorm (scales only), another function
  assert shapes["rmsnorm"] == base
  params = init(models["baseline"])
  diff = jnp.abs(models["rmsnorm"].apply(params, tokens) - models["baseline"].apply(params, tokens))
  assert float(diff.max()) > 1e-3
  # rope: no learned position table, nothing else changed
  assert shapes["rope"] == {k: v for k, v in base.items() if k != "params/wpe/embedding"}
  # swiglu: a gate beside up in every MLP, d_ff 8/3 d (rounded up to 64) instead of 4 d
  swiglu = shapes["swiglu"]
  assert set(swiglu) - set(base) == {f"params/{h}/mlp/gate/kernel" for h in layers}
  for h in layers:
    assert base[f"params/{h}/mlp/up/kernel"] == (128, 512)
    assert (
      swiglu[f"params/{h}/mlp/up/kernel"] == swiglu[f"params/{h}/mlp/gate/kernel"] == (128, 384)
    )
    assert swiglu[f"params/{h}/mlp/down/kernel"] == (384, 128)


@pytest.mark.slow
def test_a_bad_override_fails_its_variant_only(swept):
  tmp_path, proc = swept
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert "[typo] error: variant 'typo': unknown config key 'model.nrom'" in proc.stdout
  assert "2 of 4 variants done; failed: typo, nodata" in proc.stdout
  # A variant that fails in training: its error line on the console, not just an exit code.
  assert "[nodata] failed: gptjax: error: " in proc.stdout and "/nonexistent" in proc.stdout
  # Progress inside each variant reaches the console (its whole log is in train.log).
  assert "[base] step 12/12 | loss " in proc.stdout and "[rms] eval step 12 | " in proc.stdout
  for name in ("base", "rms"):
    summary = json.loads((tmp_path / "runs" / name / "summary.json").read_text())
    assert summary["steps"] == 12


@pytest.mark.slow
def test_an_interrupted_variant_resumes(swept):
  tmp_path, _ = swept
  log = (tmp_path / "runs" / "rms" / "train.log").read_text()
  assert "resumed from checkpoint 6" in log


@pytest.mark.slow
def test_a_finished_variant_is_skipped(swept):
  tmp_path, _ = swept
  before = (tmp_path / "runs" / "base" / "summary.json").stat().st_mtime_ns
  proc = _sweep(tmp_path, "--variant=base")
  assert proc.returncode == 0 and "[base] already finished; skipped" in proc.stdout
  assert (tmp_path / "runs" / "base" / "summary.json").stat().st_mtime_ns == before
  proc = _sweep(tmp_path, "--print_commands")
  lines = proc.stdout.splitlines()
  assert len(lines) == 4 and all(l.startswith("python -m gptjax.main --config=") for l in lines)
  assert lines[1].endswith("--config.model.norm=rmsnorm")


@pytest.mark.slow
def test_report_reads_every_variants_metrics(swept):
  tmp_path, _ = swept
  root = tmp_path / "runs"
  text = report.report(str(root))
  rows = {r["variant"]: r for r in report.collect(str(root))}
  assert set(rows) == {"base", "rms", "typo", "nodata"}
  assert rows["typo"]["failed"].startswith("failed: variant 'typo': unknown config key")
  assert rows["nodata"]["failed"].startswith("failed: gptjax: error: ")
  assert "| 0 (failed: variant 'typo': unknown config key 'model.nrom') |" in text
  for name in ("base", "rms"):
    row = rows[name]
    metrics = [json.loads(l) for l in (root / name / "metrics.jsonl").read_text().splitlines()]
    vals = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert row["best_val_loss"] == min(vals) and row["final_val_loss"] == vals[-1]
    assert f"{min(vals):.4f}" in text and row["params"] > 0
  assert "model.norm=rmsnorm" in text
  assert (root / "report.md").read_text().count("\n| ") == 5  # the header row + 4 variants
  assert (root / "val_loss.png").stat().st_size > 10_000


@pytest.mark.slow
def test_sweep_flag_errors_are_one_line(tmp_path):
  """The sweep program's flags go through cli.py as gptjax.main's do; its messages (a
  missing experiment file, a bad variant) are checked in-process below and in main_test."""
  args = ["--config=experiments/shakespeare_ablation.py", "--config.model.nrom=1"]
  fragment = "unknown config key 'config.model.nrom' (Did you mean"
  proc = subprocess.run(
    [sys.executable, "-m", "gptjax.sweep", f"--workdir={tmp_path}", *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert proc.stderr.startswith("gptjax.sweep: error: ") and fragment in proc.stderr


def test_a_missing_experiment_file_or_an_unknown_variant_is_named():
  with pytest.raises(UserError, match="experiment file 'experiments/nope.py' not found"):
    cli.check_config_file(["gptjax.sweep", "--config=experiments/nope.py"])
  spec = importlib.util.spec_from_file_location(
    "_sweep_test_ablation", os.path.join(REPO, "experiments", "shakespeare_ablation.py")
  )
  ablation = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(ablation)  # what --config=FILE:bad loads, before any variant runs
  with pytest.raises(UserError, match="unknown variant 'bad'"):
    ablation.get_config("bad")


def test_a_failed_variant_says_why_on_the_console_and_in_the_report(tmp_path):
  log = tmp_path / "train.log"
  log.write_text(
    "step 1/10 | loss 4.1\nTraceback (most recent call last):\n  ...\nValueError: boom\n"
  )
  assert sweep._cause(str(log), 1) == "ValueError: boom (exit code 1)"
  log.write_text("step 1/10\ngptjax: error: config.optim.lr=0 must be above 0\n")
  assert sweep._cause(str(log), 1) == "gptjax: error: config.optim.lr=0 must be above 0"
  variant = tmp_path / "runs" / "broken"
  variant.mkdir(parents=True)
  (variant / "metrics.jsonl").write_text('{"step": 5, "loss": 3.0}\n')
  (variant / sweep.FAILED).write_text("failed: ValueError: boom (exit code 1)\n")
  (row,) = report.collect(str(tmp_path / "runs"))
  assert row["failed"] == "failed: ValueError: boom (exit code 1)"
  assert "| 5 (failed: ValueError: boom (exit code 1)) |" in report.table([row])


def test_files_cut_short_by_a_kill_are_named_or_skipped(tmp_path):
  """A killed run's metrics.jsonl may end in half a line (a resume ignores it, and so does
  the report); a truncated summary.json or sweep.json is a one-line error naming the file."""
  variant = tmp_path / "runs" / "v"
  variant.mkdir(parents=True)
  (variant / "metrics.jsonl").write_text('{"step": 5, "loss": 3.0}\n{"step": 10, "lo')
  (row,) = report.collect(str(tmp_path / "runs"))
  assert row["steps"] == 5 and row["final_loss"] == 3.0
  with pytest.raises(UserError, match="is one run's workdir; report reads a sweep's --workdir"):
    report.collect(str(variant))
  (variant / "summary.json").write_text('{"steps": 1')
  for call in (
    lambda: sweep.finished(str(variant), 10),
    lambda: report.collect(str(variant.parent)),
  ):
    with pytest.raises(UserError, match="summary.json is not readable JSON .*cut it short"):
      call()
  (variant / "summary.json").unlink()
  (tmp_path / "runs" / "sweep.json").write_text('{"config": ')
  with pytest.raises(UserError, match="sweep.json is not readable JSON"):
    report.collect(str(tmp_path / "runs"))


def test_a_rerun_with_other_overrides_is_refused(tmp_path):
  """A finished 200-step variant must not silently resume to another num_steps because the
  rerun left out the sweep's overrides; paths that only say where things are may differ."""
  (tmp_path / "exp.py").write_text(EXPERIMENT.format(experiments=os.path.join(REPO, "experiments")))
  spec, root = str(tmp_path / "exp.py"), str(tmp_path / "runs")
  first = ["--config.train.num_steps=200", "--config.compilation_cache_dir=/tmp/a"]
  quiet = lambda line: None
  sweep.run(spec, None, root, first, print_commands=True, say=quiet)
  sweep.run(spec, None, root, ["--config.train.num_steps=200"], "base", True, quiet)
  with pytest.raises(UserError, match=r"swept with --config.train.num_steps=200 \(sweep.json\)"):
    sweep.run(spec, None, root, [], "base", print_commands=True, say=quiet)
  with pytest.raises(UserError, match="swept with \\(no --config.model.norm\\)"):
    sweep.run(spec, None, root, [*first, "--config.model.norm=rmsnorm"], print_commands=True)
  (tmp_path / "other.py").write_text((tmp_path / "exp.py").read_text())
  with pytest.raises(UserError, match="holds the sweep of .*exp.py"):
    sweep.run(str(tmp_path / "other.py"), None, root, first, print_commands=True, say=quiet)


@pytest.mark.slow
def test_a_signal_to_the_sweep_reaches_its_variant_which_saves(tmp_path):
  """SIGTERM to the sweep alone used to leave the variant running into a closed pipe, dying
  unsaved; now the sweep passes it on, logs the variant's last words, and stops."""
  (tmp_path / "exp.py").write_text(EXPERIMENT.format(experiments=os.path.join(REPO, "experiments")))
  proc = subprocess.Popen(
    [sys.executable, "-m", "gptjax.sweep", f"--config={tmp_path / 'exp.py'}",
     f"--workdir={tmp_path / 'runs'}", f"--config.compilation_cache_dir={COMPILATION_CACHE_DIR}",
     "--variant=base", "--config.train.num_steps=100000", "--config.train.log_every=1"],
    cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    env={**os.environ, **ONE_DEVICE},
  )  # fmt: skip
  try:
    for line in proc.stdout:
      if line.startswith("[base] step "):
        break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
  finally:
    proc.kill()
  assert proc.returncode == 1 and "[base] SIGTERM received: saved checkpoint" in out, err
  assert err.splitlines()[-1].startswith("gptjax.sweep: error: stopped by SIGTERM, passed on")
  log = (tmp_path / "runs" / "base" / "train.log").read_text()
  step = int(log.split("SIGTERM received: saved checkpoint ")[1].split()[0])
  assert (tmp_path / "runs" / "base" / "checkpoints" / str(step)).is_dir()

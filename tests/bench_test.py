"""Benchmarks run end to end (their figures are recorded in docs/BENCHMARKS.md, never asserted)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ONE_DEVICE, REPO, with_test_cache

# Every benchmark runs as `python -m gptjax.bench` (a program module: its flags cannot be
# defined in the test process beside another program's), so the whole file is the slow tier.
pytestmark = pytest.mark.slow
TINY = "--config=experiments/tiny.py"


def _bench(*args, one_device=True, timeout=240):
  """`python -m gptjax.bench ARGS` from the repository root, with the tests' compile cache;
  one_device=False keeps the tests' 8 simulated devices."""
  return subprocess.run(
    [sys.executable, "-m", "gptjax.bench", *with_test_cache(args)],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=timeout,
    env={**os.environ, **(ONE_DEVICE if one_device else {})},
  )


def _result(proc) -> dict:
  assert proc.returncode == 0, proc.stderr[-2000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_checkpoint_bench_prints_one_json_line_and_leaves_a_runs_checkpoints_alone(
  trained_tiny, tmp_path
):
  """--workdir picks the disk; a run there keeps its checkpoints (it once lost one to
  keep-N, replaced by the bench's random step 0)."""
  run = tmp_path / "run"
  shutil.copytree(trained_tiny, run)
  files = lambda: {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
  before = files()
  result = _result(_bench("checkpoint", TINY, "--config.model.vocab_size=65", f"--workdir={run}"))
  assert result["bench"] == "checkpoint" and result["bytes"] > 0
  assert result["save_total_s"] >= result["save_blocking_s"] > 0 and result["restore_s"] > 0
  assert files() == before and len(list(run.iterdir())) == len({p.parts[0] for p in before})


def test_bench_without_a_name_is_a_one_line_error():
  proc = _bench(TINY, one_device=False, timeout=120)
  assert (
    proc.returncode == 1
    and "name one benchmark: train, checkpoint, decode, sample, serve" in proc.stderr
  )


def test_decode_bench_prints_one_json_line():
  args = ("--decode_batch=2", "--prompt_len=8", "--new_tokens=16", "--repeats=2")
  proc = _bench("decode", TINY, *args, one_device=False)
  result = _result(proc)
  assert "deprecated" not in proc.stderr
  assert result["bench"] == "decode" and result["batch"] == 2 and result["new_tokens"] == 16
  assert result["decode_tokens_per_s"] >= result["tokens_per_s"] > 0
  assert result["ms_per_step"] > 0 and result["prefill_ms"] > 0


def test_decode_bench_still_takes_the_old_batch_size_flag_with_a_warning():
  proc = _bench("decode", TINY, "--batch_size=2", "--prompt_len=8", "--new_tokens=4", "--repeats=1")
  assert _result(proc)["batch"] == 2
  warnings = [l for l in proc.stderr.splitlines() if "deprecated" in l]
  assert warnings == ["gptjax.bench: warning: --batch_size is deprecated; use --decode_batch"]


def test_decode_bench_rejects_both_batch_flags_in_one_line():
  proc = _bench("decode", TINY, "--batch_size=2", "--decode_batch=4")
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("gptjax.bench: error:")]
  assert len(errors) == 1 and "--batch_size" in errors[0] and "--decode_batch" in errors[0]


def test_a_flag_of_other_benches_is_refused():
  proc = _bench("train", TINY, "--batch_size=4")
  assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr[-2000:]
  assert "bench train takes its batch from --config.train.batch_size" in proc.stderr
  proc = _bench("train", TINY, "--quantize=int8")  # it trained in float without a word
  assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr[-2000:]
  assert "error: --quantize is for bench decode, serve" in proc.stderr


def test_decode_bench_rejects_a_prompt_beyond_the_context():
  proc = _bench("decode", TINY, "--prompt_len=30", "--new_tokens=8", one_device=False, timeout=120)
  assert proc.returncode == 1 and "exceeds the 32-token context" in proc.stderr


def test_sample_bench_times_a_trained_run(trained_tiny):
  result = _result(_bench("sample", f"--workdir={trained_tiny}", "--new_tokens=40", "--repeats=2"))
  assert result["bench"] == "sample" and result["from"] == "checkpoint 30"
  assert result["tokens_per_s_max"] >= result["tokens_per_s"] >= result["tokens_per_s_min"] > 0


def test_train_bench_times_a_fine_tuning_step_on_packed_rows():
  """Also: without --config.model.vocab_size a char model's vocabulary is unknown here, so
  the bench says which one it timed."""
  proc = _bench("train", TINY, "--config.data.source=task", "--steps=2", "--warmup=1")
  result = _result(proc)
  assert result["steps"] == 2 and result["tokens_per_step"] == 8 * 32
  assert result["vocab_size"] == 50257 and "timing a 50257-token vocabulary" in proc.stderr


def test_train_bench_times_the_real_step_and_reports_model_flops():
  args = ("--config.model.vocab_size=65", "--steps=4", "--warmup=1")
  result = _result(_bench("train", TINY, *args, one_device=False))
  assert result["bench"] == "train" and result["devices"] == 8 and result["steps"] == 4
  assert result["step_ms_max"] >= result["step_ms_median"] >= result["step_ms_min"] > 0
  assert result["tokens_per_step"] == 8 * 32
  assert result["tokens_per_s"] == pytest.approx(256 / result["step_ms_median"] * 1e3, rel=1e-3)
  assert result["flops_per_token"] == 184_512  # the hand count in metrics_test.py
  assert result["tflops"] > 0 and result["mfu"] is None  # CPUs have no peak in the table
  assert result["compile_s"] > 0 and result["memory_estimate_bytes"] > 0


@pytest.mark.slow
def test_serve_bench_loads_a_server_closed_and_open_loop():
  """bench serve: a gptjax.serve process with random weights, 4 clients then Poisson
  arrivals; every request answered, the figures there, nothing compiled under load."""
  flags = [TINY, "--config.model.vocab_size=66", "--prompt_len=8", "--new_tokens=16", "--slots=4"]
  closed = _result(_bench("serve", *flags, "--clients=4", "--requests=12"))
  assert closed["load"] == "closed" and closed["requests"] == 12 and closed["rejected"] == 0
  assert closed["output_tokens_per_s"] > 0 and closed["ttft_ms_p99"] >= closed["ttft_ms_p50"] > 0
  assert closed["compiles_under_load"] == 0
  poisson = _result(_bench("serve", *flags, "--rate=50", "--requests=10"))
  assert poisson["load"] == "poisson 50.0/s" and poisson["requests"] == 10
  assert poisson["compiles_under_load"] == 0

"""Benchmarks run end to end (their figures are recorded in BUILD_NOTES.md, never asserted)."""

import json
import subprocess
import sys

from conftest import REPO


def test_checkpoint_bench_prints_one_json_line():
  proc = subprocess.run([sys.executable, "-m", "gptjax.bench", "checkpoint",
                         "--config=experiments/tiny.py"], cwd=REPO, capture_output=True,
                        text=True, timeout=240)
  assert proc.returncode == 0, proc.stderr[-2000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["bench"] == "checkpoint" and result["bytes"] > 0
  assert result["save_total_s"] >= result["save_blocking_s"] > 0 and result["restore_s"] > 0


def test_bench_without_a_name_is_a_one_line_error():
  proc = subprocess.run([sys.executable, "-m", "gptjax.bench", "--config=experiments/tiny.py"],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1 and "name one benchmark: checkpoint" in proc.stderr

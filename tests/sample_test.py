"""--mode=sample end to end, and its errors as one line each."""

import pytest

from conftest import ONE_DEVICE, run_cli


def test_sample_prints_continuations_of_the_prompt(trained_tiny):
  proc = run_cli("--mode=sample", f"--workdir={trained_tiny}", "--prompt=ROMEO:",
                 "--num_samples=2", "--max_new_tokens=80", "--top_k=10", env=ONE_DEVICE)
  assert proc.returncode == 0, proc.stderr[-2000:]
  samples = proc.stdout.split("---------------\n")
  assert len(samples) == 3 and all(s.startswith("ROMEO:") for s in samples[:2])
  assert "from checkpoint 30" in samples[2] and "tokens/s" in samples[2]
  # 80 new tokens beyond the 32-token context: the sliding window refilled the cache
  assert all(len(s) > len("ROMEO:") + 40 or "<|endoftext|>" in s for s in samples[:2])


@pytest.mark.parametrize("args, fragment", [
    (["--prompt=caf\u00e9 \u20ac"], "character '\u00e9' (U+00E9) is not in the char vocabulary"),
    (["--top_p=1.5"], "top_p=1.5 must be in (0, 1]"),
    (["--temperature=-1"], "temperature=-1.0 must be >= 0"),
])
def test_sample_errors(trained_tiny, args, fragment):
  proc = run_cli("--mode=sample", f"--workdir={trained_tiny}", *args, env=ONE_DEVICE)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.startswith("gptjax: error:")]
  assert len(lines) == 1 and fragment in lines[0], proc.stderr[-2000:]


def test_sample_without_a_checkpoint(tmp_path):
  proc = run_cli("--mode=sample", f"--workdir={tmp_path}", env=ONE_DEVICE)
  assert proc.returncode == 1 and "holds no training run" in proc.stderr

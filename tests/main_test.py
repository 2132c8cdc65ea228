"""The CLI end to end, and every user error as one line with exit code 1."""

import json
import os

import pytest
from conftest import one_line_error, run_cli

TINY = "--config=experiments/tiny.py"


def test_cli_trains_and_writes_outputs(tmp_path, corpus):
  workdir = tmp_path / "run"
  proc = run_cli(
    TINY,
    f"--workdir={workdir}",
    f"--config.data.path={corpus}",
    "--config.train.num_steps=12",
    "--config.train.log_every=4",
    "--config.train.eval_every=6",
    "--config.model.norm=rmsnorm",
    f"--config.compilation_cache_dir={tmp_path}/xla_cache",
    env={"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"},
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "step 12/12" in proc.stdout and "tok/s" in proc.stdout and "ETA" in proc.stdout
  assert os.listdir(tmp_path / "xla_cache")  # the persistent compilation cache was written
  lines = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  train_lines = [l for l in lines if "loss" in l]
  eval_lines = [l for l in lines if "val_loss" in l]
  assert [l["step"] for l in train_lines] == [4, 8, 12]
  assert [l["step"] for l in eval_lines] == [6, 12]
  for key in ("loss", "lr", "grad_norm", "tokens_per_sec", "tflops_per_device", "elapsed_s"):
    assert all(key in l for l in train_lines)
  assert all("val_bpb" in l for l in eval_lines)
  config = json.load(open(workdir / "config.json"))
  assert config["model"]["norm"] == "rmsnorm" and config["train"]["num_steps"] == 12
  assert config["model"]["vocab_size"] > 0  # resolved from the tokenizer
  events = [f for f in os.listdir(workdir) if f.startswith("events.out.tfevents")]
  assert events

  import tensorflow as tf  # reads TensorBoard's event format

  scalars = {}
  for event in tf.compat.v1.train.summary_iterator(str(workdir / events[0])):
    for v in event.summary.value:
      scalars.setdefault(v.tag, []).append(event.step)
  assert {"loss", "lr", "grad_norm", "tokens_per_sec", "val_loss"} <= set(scalars)
  assert scalars["loss"] == [4, 8, 12] and scalars["val_loss"] == [6, 12]


def test_unknown_config_key(tmp_path):
  one_line_error(run_cli(TINY, f"--workdir={tmp_path}", "--config.model.n_layers=3"), "n_layers")


def test_wrong_type_for_config_key(tmp_path):
  one_line_error(run_cli(TINY, f"--workdir={tmp_path}", "--config.model.n_layer=abc"), "n_layer")


def test_unknown_experiment_variant(tmp_path):
  one_line_error(
    run_cli("--config=experiments/shakespeare_char.py:gpu2", f"--workdir={tmp_path}"), "gpu2"
  )


def test_missing_experiment_file(tmp_path):
  one_line_error(run_cli("--config=experiments/nope.py", f"--workdir={tmp_path}"), "nope.py")


def test_d_model_not_divisible_by_n_head(tmp_path):
  one_line_error(
    run_cli(TINY, f"--workdir={tmp_path}", "--config.model.n_head=3"), "d_model=32", "n_head=3"
  )


def test_bad_choice(tmp_path):
  one_line_error(
    run_cli(TINY, f"--workdir={tmp_path}", "--config.model.norm=batchnorm"), "model.norm", "rmsnorm"
  )


@pytest.mark.parametrize(
  "override,fragment",
  [
    ("--config.optim.lr=-0.1", "optim.lr"),
    ("--config.optim.b2=1.5", "optim.b2"),
    ("--config.model.vocab_size=10", "vocab_size=10"),
    ("--config.optim.grad_accum=3", "grad_accum=3"),
    ("--config.model.attention=cudnn", "cudnn"),
    ("--config.model.remat=all", "model.remat"),
    ("--config.cpu_devices=0", "cpu_devices=0"),
  ],
)
def test_bad_values_are_named(tmp_path, corpus, override, fragment):
  one_line_error(
    run_cli(TINY, f"--workdir={tmp_path}/w", f"--config.data.path={corpus}", override), fragment
  )


def test_missing_text_file(tmp_path):
  one_line_error(
    run_cli(TINY, f"--workdir={tmp_path}/w", f"--config.data.path={tmp_path}/missing.txt"),
    "missing.txt",
  )


def test_empty_text_file(tmp_path):
  (tmp_path / "empty.txt").write_text("")
  one_line_error(
    run_cli(TINY, f"--workdir={tmp_path}/w", f"--config.data.path={tmp_path}/empty.txt"), "empty"
  )


def test_corpus_shorter_than_one_window(tmp_path):
  (tmp_path / "short.txt").write_text("a short line\n" * 4)
  one_line_error(
    run_cli(
      TINY,
      f"--workdir={tmp_path}/w",
      f"--config.data.path={tmp_path}/short.txt",
      "--config.data.val_fraction=0.5",
    ),
    "fewer than one window",
    "block_size",
  )


def test_unwritable_workdir(tmp_path):
  (tmp_path / "a_file").write_text("")  # a directory cannot live under a file, even for root
  one_line_error(run_cli(TINY, f"--workdir={tmp_path}/a_file/run"), "workdir")


def test_missing_workdir_flag():
  one_line_error(run_cli(TINY), "--workdir")


def test_tfds_dataset_that_cannot_be_downloaded(tmp_path):
  """Offline, TFDS's download fails (fast: no retries)."""
  one_line_error(
    run_cli(
      "--config=experiments/shakespeare_char.py:cpu",
      f"--workdir={tmp_path}/w",
      f"--config.data.data_dir={tmp_path}/tfds",
      "--config.data.download_retries=0",
      "--config.mesh.shape.tensor=2",
    ),  # data=4: batch 12 on 8 devices
    "manual_dir",
  )


def test_compile_only_reports_memory_and_runs_nothing(tmp_path, corpus):
  proc = run_cli(
    "--mode=compile_only",
    TINY,
    f"--workdir={tmp_path}/w",
    f"--config.data.path={corpus}",
    "--config.mesh.shape.fsdp=2",
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "mesh {'data': 4, 'fsdp': 2, 'tensor': 1}" in proc.stdout
  assert "per device: params" in proc.stdout and "step temporaries" in proc.stdout
  assert "step 1/" not in proc.stdout and not (tmp_path / "w" / "metrics.jsonl").exists()


def test_an_experiment_file_without_get_config(tmp_path):
  (tmp_path / "exp.py").write_text("def config():\n  return None\n")
  one_line_error(
    run_cli(f"--config={tmp_path}/exp.py", f"--workdir={tmp_path}/w"),
    f"experiment file {tmp_path}/exp.py defines no get_config()",
  )
  (tmp_path / "bad.py").write_text("def get_config(:\n")
  one_line_error(
    run_cli(f"--config={tmp_path}/bad.py", f"--workdir={tmp_path}/w"),
    "has a syntax error at line 1",
  )

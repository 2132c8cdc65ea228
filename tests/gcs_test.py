"""Workdirs, data and tokenizers on Cloud Storage (gs://), against fake-gcs-server on
127.0.0.1 (tests/gcs_emulator.py): the CLI's workdir paths end to end, on the tiny model."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from conftest import (
  COMPILATION_CACHE_DIR,
  REPO,
  SHAKESPEARE_DIR,
  free_port,
  one_line_error,
  run_cli,
  start_cli,
  wait_for,
  with_test_cache,
)
from gcs_emulator import BUCKET

TINY = "--config=experiments/tiny.py"
STEPS = 60
EXACT = ("loss", "lr", "grad_norm", "val_loss", "val_bpb")  # timing fields differ, these not


def _args(gcs, run, tmp_path, *extra):
  return [
    TINY,
    f"--workdir=gs://{BUCKET}/{run}",
    f"--config.data.cache_dir={tmp_path}/cache",  # each host's copy of the token files
    f"--config.train.num_steps={STEPS}",
    "--config.train.log_every=1",
    "--config.train.eval_every=10",
    "--config.checkpoint.every=10",
    "--config.checkpoint.keep_best=true",
    "--config.model.dropout=0.1",
    *extra,
  ]


def _env(gcs):
  return {**gcs.env, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


def _metrics(gcs, run):
  lines = [json.loads(l) for l in gcs.read(f"{run}/metrics.jsonl").decode().splitlines()]
  return [{k: l[k] for k in ("step", *EXACT) if k in l} for l in lines]


def _steps(gcs, run, kind="checkpoints"):
  """Steps whose saves are whole (orbax writes commit_success.txt last on a bucket)."""
  names = gcs.names(f"{run}/{kind}/")
  return sorted(int(n.split("/")[2]) for n in names if n.count("/") == 3 and n.endswith("/commit_success.txt"))  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(gcs, tmp_path_factory):
  tmp = tmp_path_factory.mktemp("gs")
  proc = run_cli(*_args(gcs, "uninterrupted", tmp), env=_env(gcs))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return _metrics(gcs, "uninterrupted")


@pytest.mark.slow
def test_a_gs_run_keeps_its_best_exports_samples_and_chats(gcs, uninterrupted):
  vals = {l["step"]: l["val_loss"] for l in uninterrupted if "val_loss" in l}
  assert _steps(gcs, "uninterrupted", "checkpoints_best") == [min(vals, key=vals.get)]
  assert any("/events.out.tfevents." in n for n in gcs.names("uninterrupted/"))  # TensorBoard
  assert not os.path.exists(os.path.join(REPO, "gs:"))  # nothing went to a local "gs:" dir
  run = f"gs://{BUCKET}/uninterrupted"
  from gptjax import workdir

  assert workdir.run_files(run) == run  # what --config.init_from=gs://... reads
  for args in (["--mode=export"], ["--mode=export", "--export_format=hf"]):
    proc = run_cli(*args, f"--workdir={run}", env=_env(gcs))
    assert proc.returncode == 0, proc.stderr[-3000:]
  names = set(gcs.names("uninterrupted/export"))
  for name in ("export/config.json", "export/tokenizer.json", "export_hf/model.safetensors"):
    assert f"uninterrupted/{name}" in names, sorted(names)
  for where in (run, f"{run}/export"):
    proc = run_cli("--mode=sample", f"--workdir={where}", "--max_new_tokens=8", env=_env(gcs))
    assert proc.returncode == 0, proc.stderr[-3000:]
  proc = run_cli(
    "--mode=chat", f"--workdir={run}", "--max_new_tokens=8", env=_env(gcs), stdin="hi\n"
  )
  assert proc.returncode == 0, proc.stderr[-3000:]

  from safetensors.numpy import load

  weights = load(gcs.read("uninterrupted/export_hf/model.safetensors"))
  assert weights["transformer.wte.weight"].shape[1] == 32


@pytest.mark.slow
def test_sigterm_saves_and_a_corrupt_checkpoint_is_set_aside_on_gs(gcs, uninterrupted, tmp_path):
  proc = start_cli(*_args(gcs, "stopped", tmp_path), env=_env(gcs))
  try:
    wait_for(proc, lambda: len(_steps(gcs, "stopped")) >= 1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
  finally:
    proc.kill()
  assert proc.returncode == 0, err[-3000:]
  stopped = int(out.split("saved checkpoint ")[1].split()[0])
  assert stopped in _steps(gcs, "stopped") and stopped < STEPS
  bucket = gcs.client().bucket(BUCKET)
  for name in gcs.names(f"stopped/checkpoints/{stopped}/params/"):
    if "/d/" in name:  # garbage in every data file of the newest checkpoint's params
      bucket.blob(name).upload_from_string(os.urandom(64))
  rerun = run_cli(*_args(gcs, "stopped", tmp_path), env=_env(gcs))
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "moved to checkpoints_corrupt/ and resuming from the previous one" in rerun.stdout
  assert any(n.startswith(f"stopped/checkpoints_corrupt/{stopped}/") for n in gcs.names("stopped/"))
  assert _metrics(gcs, "stopped") == uninterrupted


@pytest.mark.slow
def test_data_and_a_bpe_tokenizer_read_from_gs(gcs, tmp_path):
  """--config.data.path as a gs:// glob, tokenizer files on gs://; a second host (an empty
  local cache) downloads the run's token files instead of tokenizing again."""
  text = open(os.path.join(SHAKESPEARE_DIR, "input.txt")).read()[:40000]
  bucket = gcs.client().bucket(BUCKET)
  for i, part in enumerate((text[:20000], text[20000:])):
    bucket.blob(f"corpus/part{i}.txt").upload_from_string(part)
  from tokenizers import ByteLevelBPETokenizer

  bpe = ByteLevelBPETokenizer()
  bpe.train_from_iterator([text], vocab_size=300, special_tokens=["<|endoftext|>"])
  bucket.blob("tok/tokenizer.json").upload_from_string(bpe._tokenizer.to_str())
  args = [
    TINY,
    f"--workdir=gs://{BUCKET}/bpe",
    f"--config.data.path=gs://{BUCKET}/corpus/*.txt",
    "--config.data.tokenizer=bpe",
    f"--config.data.tokenizer_path=gs://{BUCKET}/tok",
  ]
  for host, steps in (("a", 5), ("b", 6)):  # b trains on from a's checkpoint, as a host would
    cache, steps = f"--config.data.cache_dir={tmp_path}/{host}", f"--config.train.num_steps={steps}"
    proc = run_cli(*args, cache, steps, env=_env(gcs))
    assert proc.returncode == 0, proc.stderr[-3000:]
  assert {"bpe/data/train.bin", "bpe/tokenizer.json"} <= set(gcs.names("bpe/"))
  local = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path / "b") for f in fs]
  assert sorted(os.path.basename(f) for f in local) == [
    "train.bin", "train.bin.json", "val.bin", "val.bin.json"
  ]  # fmt: skip
  assert open(next(f for f in local if f.endswith("train.bin")), "rb").read() == gcs.read(
    "bpe/data/train.bin"
  )


@pytest.mark.slow
def test_gs_errors_are_one_line(gcs, tmp_path):
  proc = run_cli(TINY, "--workdir=gs://no-such-bucket/run", env=_env(gcs))
  one_line_error(proc, "cannot write to 'gs://no-such-bucket/run'", "--workdir")
  # gs:// on an install without the GCS packages (an import of gcsfs fails)
  (tmp_path / "gcsfs.py").write_text("raise ImportError('no gcsfs')\n")
  env = {**_env(gcs), "PYTHONPATH": str(tmp_path)}
  proc = run_cli(TINY, f"--workdir=gs://{BUCKET}/x", env=env)
  one_line_error(proc, "needs the GCS packages", "pip install")


SWEEP = """
import os, sys
sys.path.insert(0, {experiments!r})
import tiny

def get_config():
  c = tiny.get_config()
  c.train.num_steps, c.train.eval_every, c.checkpoint.every = 6, 3, 3
  return c

def get_sweep():
  return {{"base": {{}}, "typo": {{"model.nrom": "x"}}, "nodata": {{"data.path": "/no/such.txt"}}}}
"""


@pytest.mark.slow
def test_a_sweep_and_its_report_in_gs(gcs, tmp_path):
  (tmp_path / "exp.py").write_text(SWEEP.format(experiments=os.path.join(REPO, "experiments")))
  root = f"gs://{BUCKET}/sweep"
  proc = subprocess.run(
    [sys.executable, "-m", "gptjax.sweep", f"--config={tmp_path / 'exp.py'}",
     f"--workdir={root}", f"--config.compilation_cache_dir={COMPILATION_CACHE_DIR}",
     f"--config.data.cache_dir={tmp_path}/cache"],
    cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, **_env(gcs)},
  )  # fmt: skip
  assert proc.returncode == 1, proc.stderr[-3000:]  # one variant failed, and says so
  assert "[base] finished" in proc.stdout, proc.stdout[-3000:]
  names = set(gcs.names("sweep/"))
  assert "[nodata] failed: gptjax: error: no file matches" in proc.stdout, proc.stdout[-3000:]
  for name in ("sweep.json", "base/summary.json", "base/train.log", "typo/sweep_failed.txt"):
    assert f"sweep/{name}" in names, sorted(names)
  assert "done: 6 steps" in gcs.read("sweep/base/train.log").decode()
  proc = subprocess.run(
    [sys.executable, "-m", "gptjax.report", root],
    cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, **_env(gcs)},
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = gcs.read("sweep/report.md").decode()
  assert "| base" in report and "typo" in report, report
  assert gcs.read("sweep/val_loss.png").startswith(b"\x89PNG")


TWO_STEPS = 24
FSDP4 = ["--config.mesh.shape.fsdp=2", "--config.mesh.shape.data=1"]  # x2 across processes


def _two_args(run, cache):
  return [
    TINY,
    f"--workdir={run}",
    f"--config.data.cache_dir={cache}",
    f"--config.train.num_steps={TWO_STEPS}",
    "--config.train.log_every=1",
    "--config.train.eval_every=12",
    "--config.checkpoint.every=6",
    "--config.train.batch_size=8",
  ]


def _two_processes(gcs, run, tmp_path):
  """Two processes of 2 devices each, fsdp=4 across both (jax.distributed on 127.0.0.1)."""
  port = free_port()
  env = {**os.environ, **gcs.env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  return [
    subprocess.Popen(
      [
        sys.executable,
        "-m",
        "gptjax.main",
        *with_test_cache(_two_args(f"gs://{BUCKET}/{run}", tmp_path / f"host{i}")),
        *FSDP4,
        "--config.mesh.dcn_shape.fsdp=2",
        f"--config.distributed.coordinator_address=127.0.0.1:{port}",
        "--config.distributed.num_processes=2",
        f"--config.distributed.process_id={i}",
        "--config.distributed.timeout_s=60",
      ],
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )  # fmt: skip
    for i in range(2)
  ]


def _finish(procs):
  try:
    outs = [p.communicate(timeout=240) for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return outs


@pytest.mark.slow
def test_two_processes_killed_together_resume_and_match_one_process(gcs, tmp_path):
  """Two processes on a gs:// workdir, killed together (SIGKILL) after a checkpoint and run
  again, resume and finish as one process with the same four devices trains uninterrupted:
  the same losses (to float rounding: the reductions are split differently), each step
  logged once, each process writing its own shards. A wrong restore (a shard, the optimizer
  state, the data position) moves the losses far beyond that rounding."""
  local = tmp_path / "one"
  one = run_cli(*_two_args(local, tmp_path / "cache"), "--config.mesh.shape.fsdp=4",
                "--config.mesh.shape.data=1", env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})  # fmt: skip
  assert one.returncode == 0, one.stderr[-3000:]
  procs = _two_processes(gcs, "two", tmp_path)
  try:
    wait_for(procs[0], lambda: len(_steps(gcs, "two")) >= 1)
    for p in procs:
      p.send_signal(signal.SIGKILL)
  finally:
    for p in procs:
      p.kill()
      p.communicate()
  assert _steps(gcs, "two")[-1] < TWO_STEPS
  outs = _finish(_two_processes(gcs, "two", tmp_path))
  assert "resumed from checkpoint" in outs[0][0] and "2 process(es)" in outs[0][0]
  assert "step" not in outs[1][0] and "mesh" not in outs[1][0]  # only process 0 reports
  two = _metrics(gcs, "two")
  assert [l["step"] for l in two if "loss" in l] == list(range(1, TWO_STEPS + 1))  # one writer
  single = [json.loads(l) for l in open(local / "metrics.jsonl")]
  assert [l["lr"] for l in two if "lr" in l] == [l["lr"] for l in single if "lr" in l]
  for key in ("loss", "val_loss"):
    np.testing.assert_allclose(
      [l[key] for l in two if key in l], [l[key] for l in single if key in l], rtol=1e-5
    )
  params = gcs.names(f"two/checkpoints/{TWO_STEPS}/params/")
  for i in range(2):  # fsdp over both processes: each wrote its own shards, under its name
    assert any(f"/ocdbt.process_{i}/d/" in n for n in params), params

"""The CLI end to end, and every user error as one line with exit code 1."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, one_line_error, run_cli, tiny_config

from gptjax import cli, loop
from gptjax.errors import UserError

TINY = "--config=experiments/tiny.py"

# One subprocess per CLI contract (marked slow); the messages themselves are checked
# in-process where the library raises them: config_test (validate), data_test, model_test,
# attention_test, workdir_test, experiments_test, and the experiment-file tests below.


@pytest.mark.slow
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


@pytest.mark.slow
def test_unknown_config_key(tmp_path):
  one_line_error(
    run_cli(TINY, f"--workdir={tmp_path}", "--config.model.n_layers=3"),
    "unknown config key 'config.model.n_layers'",
  )


def test_an_unknown_config_key_is_named_with_its_dotted_path():
  """ml_collections names only the leaf (in an AttributeError around a KeyError): the one
  line names the key as typed, with ml_collections' suggestion."""
  argv = ["gptjax", TINY, "--config.model.n_layers=3"]
  with pytest.raises(AttributeError) as e:
    tiny_config().model.n_layers  # noqa: B018 (the lookup is the test)
  assert cli._unknown_key(e.value, argv) == (
    'unknown config key \'config.model.n_layers\' (Did you mean "n_layer" instead of "n_layers"?); '
    "the keys and their defaults are in gptjax/config.py"
  )


@pytest.mark.slow
def test_wrong_type_for_config_key(tmp_path):
  one_line_error(run_cli(TINY, f"--workdir={tmp_path}", "--config.model.n_layer=abc"), "n_layer")


@pytest.mark.slow
def test_unknown_flag(tmp_path):
  one_line_error(
    run_cli(TINY, f"--workdir={tmp_path}", "--nosuch_flag=1"),
    "Unknown command line flag 'nosuch_flag'",
  )


@pytest.mark.slow
def test_missing_experiment_file(tmp_path):
  one_line_error(run_cli("--config=experiments/nope.py", f"--workdir={tmp_path}"), "nope.py")


@pytest.mark.slow
def test_missing_workdir_flag():
  one_line_error(run_cli(TINY), "--workdir")


@pytest.mark.slow
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


def test_a_missing_or_broken_experiment_file_is_named(tmp_path):
  """Every program checks --config's file before ml_collections loads it (cli.py)."""

  def refused(argv, message):
    with pytest.raises(UserError, match=re.escape(message)):
      cli.check_config_file(argv)

  refused(
    ["gptjax", "--config=experiments/nope.py", f"--workdir={tmp_path}"],
    "experiment file 'experiments/nope.py' not found",
  )
  (tmp_path / "exp.py").write_text("def config():\n  return None\n")
  refused(
    [f"--config={tmp_path}/exp.py:cpu"],
    f"experiment file {tmp_path}/exp.py defines no get_config()",
  )
  (tmp_path / "bad.py").write_text("def get_config(:\n")
  refused(
    [f"--config={tmp_path}/bad.py"],
    f"experiment file {tmp_path}/bad.py has a syntax error at line 1",
  )
  (tmp_path / "good.py").write_text("from tiny import get_config\n")  # imported counts
  cli.check_config_file([f"--config={tmp_path}/good.py", "--config.model.n_layer=1"])
  refused(["--config=experiments/tiny.py:cpu:x"], "tiny.py's get_config() takes no argument; drop ':cpu:x'")  # fmt: skip
  cli.check_config_file(["--config=experiments/shakespeare_char.py:cpu:x"])  # its own to refuse
  (tmp_path / "needs.py").write_text("def get_config(size):\n  return None\n")
  refused([f"--config={tmp_path}/needs.py"], "get_config() needs an argument: --config=")
  for fine in ("experiments/gpt2.py", "experiments/gpt2.py:small"):  # an optional argument
    cli.check_config_file([f"--config={fine}"])


@pytest.mark.slow
def test_compile_only_with_gpt2_bpe_reads_no_data(tmp_path, capsys):
  """GPT-2 BPE's size is fixed, so compile_only needs neither the dataset nor vocab_size."""
  config = tiny_config(data__tokenizer="bpe", data__path=str(tmp_path / "absent.txt"))
  out = loop.compile_only(config, str(tmp_path / "w"))
  assert "compile_only: vocabulary 50257; no data is read" in capsys.readouterr().out
  assert out["memory"]["params"] > 0 and not (tmp_path / "w" / "data").exists()


@pytest.mark.slow  # a CLI subprocess each
@pytest.mark.parametrize(
  "args, fragment",
  [
    (("--mode=sample", "--eval_records=5"), "--eval_records is read by --mode=evaluate, not --mode=sample"),
    (("--mode=export", f"--config={TINY[len('--config='):]}"), "--mode=export exports a run as it was trained"),
    ((TINY, "--temperature=0"), "--temperature is read by --mode=sample|chat|evaluate, not --mode=train"),
    (("--mode=chat", "--export_dir=x"), "--export_dir is read by --mode=export, not --mode=chat"),
    (("--mode=sample", "--config.model.n_layer=2"), "override needs --config=experiments/NAME.py"),
  ],
)  # fmt: skip
def test_a_flag_the_mode_does_not_read_is_refused_not_ignored(tmp_path, args, fragment):
  proc = run_cli(f"--workdir={tmp_path}", *args)
  assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0, proc.stderr[-2000:]
  assert fragment in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("program", ["gptjax.main", "gptjax.serve"])
def test_ctrl_c_while_the_program_imports_is_one_line(program, tmp_path):
  """The first seconds of a run import JAX (and a C extension interrupted mid-import used to
  surface as an ImportError traceback): Ctrl-C there ends the run with one line, as SIGINT."""
  proc = subprocess.Popen(
    [sys.executable, "-m", program, TINY, f"--workdir={tmp_path}/w"],
    cwd=REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  time.sleep(0.3)  # JAX alone takes over a second to import
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=60)
  name = "gptjax" if program == "gptjax.main" else program
  assert (proc.returncode, err) == (-signal.SIGINT, f"{name}: interrupted while starting\n")
  assert not os.path.exists(tmp_path / "w")

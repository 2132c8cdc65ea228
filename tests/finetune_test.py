"""Supervised fine-tuning through the CLI: task runs resume bit-exact after SIGKILL and agree
across grad_accum and meshes, bad input is one line naming the file and line, and
--config.init_from starts from a gptjax run's weights, shape and vocabulary."""

import hashlib
import json
import os
import re
import signal

import pytest
from conftest import (
  DIALOGUE_DIR,
  ONE_DEVICE,
  finalized_steps,
  one_line_error,
  run_cli,
  start_cli,
  tiny_config,
  wait_for,
)

from gptjax import chat_template, export, inference, loop
from gptjax.errors import UserError
from gptjax.workdir import LOCK

DIALOGUE = DIALOGUE_DIR
TINY = "--config=experiments/tiny.py"
TASK = ["--config.data.source=task", "--config.data.chat_template=plain"]
EXACT = ("loss", "lr", "grad_norm", "trained_tokens", "val_loss", "val_bpb")
GOOD = (
  '{"messages": [{"role": "user", "content": "Hail."}, {"role": "assistant", "content": "Ho."}]}'
)


def _small_jsonl(directory, n=200) -> str:
  """The first n conversations of the dialogue fixture, as a JSONL file of their own."""
  path = os.path.join(directory, f"first{n}.jsonl")
  with open(os.path.join(DIALOGUE, "train.jsonl")) as f:
    lines = [next(f) for _ in range(n)]
  with open(path, "w") as f:
    f.writelines(lines)
  return path


def _metrics(workdir, keys=EXACT):
  lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return [{k: l[k] for k in ("step", *keys) if k in l} for l in lines]


def _losses(workdir):
  return {l["step"]: l["loss"] for l in _metrics(workdir) if "loss" in l}


def _config(workdir):
  with open(os.path.join(workdir, "config.json")) as f:
    return json.load(f)


def _snapshot(directory) -> dict:
  """Every file under `directory` (but the run lock, which each start takes and truncates):
  relative path -> (mtime_ns, sha256 of its bytes)."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      if name == LOCK and root == str(directory):
        continue
      with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
      out[os.path.relpath(path, directory)] = (os.stat(path).st_mtime_ns, digest)
  return out


# --- Sharded, resumable, bit-exact like pre-training -----------------------------------------

STEPS = 60
RESUMABLE = [
  TINY,
  *TASK,
  f"--config.train.num_steps={STEPS}",
  "--config.train.log_every=1",
  "--config.train.eval_every=20",
  "--config.checkpoint.every=10",
  "--config.model.dropout=0.1",  # so the rng state matters too
]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
  return _small_jsonl(tmp_path_factory.mktemp("small_data"))


@pytest.mark.slow
def test_a_task_run_killed_and_rerun_gives_the_uninterrupted_metrics_bit_for_bit(
  tmp_path, small_data
):
  args = [*RESUMABLE, f"--config.data.path={small_data}"]
  whole = run_cli(*args, f"--workdir={tmp_path}/whole", env=ONE_DEVICE)
  assert whole.returncode == 0, whole.stderr[-2000:]
  assert "train task data: 180 conversations in " in whole.stdout  # 200 less val_fraction 0.1
  assert "val task data: 20 conversations in " in whole.stdout
  uninterrupted = _metrics(tmp_path / "whole")
  assert [m["step"] for m in uninterrupted if "loss" in m] == list(range(1, STEPS + 1))
  assert [m["step"] for m in uninterrupted if "val_loss" in m] == [20, 40, 60]

  workdir = tmp_path / "killed"
  proc = start_cli(*args, f"--workdir={workdir}", env=ONE_DEVICE)
  try:
    wait_for(proc, lambda: len(finalized_steps(workdir)) >= 2)
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.kill()
    proc.communicate()
  assert proc.returncode == -signal.SIGKILL
  assert _metrics(workdir)[-1]["step"] < STEPS  # it really was cut short
  resumed_at = max(finalized_steps(workdir))
  rerun = run_cli(*args, f"--workdir={workdir}", env=ONE_DEVICE)
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  assert f"resumed from checkpoint {resumed_at}" in rerun.stdout, rerun.stdout[-2000:]
  assert "data order from here differs" not in rerun.stdout
  assert _metrics(workdir) == uninterrupted  # floats compared exactly


# --- Bad input: one line naming the file and line, and the workdir untouched ----------------


@pytest.fixture
def workdir(tmp_path):
  """A new run's workdir, holding only a file of the user's. (A workdir holding a run trained
  on other data is refused before its data is read: test_a_run_never_resumes_onto_other_data.)"""
  (tmp_path / "w").mkdir()
  (tmp_path / "w" / "notes.txt").write_text("mine")
  return tmp_path / "w"


# Line 5 closes the for while the if is still open.
TEMPLATE_WITH_SYNTAX_ERROR = (
  "{% for m in messages %}\n{{ m.content }}\n\n{% if m.role == 'user' %}\n{% endfor %}\n"
)
USER_TURNS_ONLY = (
  "{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}\n\n{% endif %}{% endfor %}"
)


# case -> (the data file's lines, a template file's text or None for "plain", what the line says)
BAD_INPUT = {
  "malformed": ([GOOD, GOOD, '{"messages": [{"role": "user"'], None, ":3: not valid JSON"),
  "role": (
    [GOOD, '{"messages": [{"role": "narrator", "content": "x"}]}'],
    None,
    ":2: turn 1: unknown role 'narrator'",
  ),
  "missing_fields": ([GOOD, GOOD, GOOD, '{"prompt": "no completion"}'], None, ":4: a record needs"),
  "empty": ([], None, " holds no records"),
  "template_syntax": ([GOOD] * 20, TEMPLATE_WITH_SYNTAX_ERROR, ": syntax error at line 5"),
  "template_no_reply": ([GOOD] * 20, USER_TURNS_ONLY, " marks no assistant reply"),
}


def _bad_input(tmp_path, case):
  """(config overrides, the file at fault) for a BAD_INPUT case."""
  data_lines, template, _ = BAD_INPUT[case]
  data = tmp_path / f"{case}.jsonl"
  data.write_text("".join(line + "\n" for line in data_lines))
  if template is None:
    return dict(data__source="task", data__path=str(data), data__chat_template="plain"), data
  named = tmp_path / f"{case}.jinja"
  named.write_text(template)
  return dict(data__source="task", data__path=str(data), data__chat_template=str(named)), named


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_task_input_names_the_file_and_line(tmp_path, workdir, case):
  overrides, named = _bad_input(tmp_path, case)
  before = _snapshot(workdir)
  with pytest.raises(UserError, match=re.escape(f"{named}{BAD_INPUT[case][2]}")):  # FILE:3: ...
    loop.train_and_evaluate(tiny_config(**overrides), str(workdir))
  assert _snapshot(workdir) == before  # nothing half-prepared left behind


@pytest.mark.slow
def test_bad_task_input_is_one_line_from_the_cli(tmp_path, workdir):
  overrides, named = _bad_input(tmp_path, "malformed")
  args = [f"--config.{k.replace('__', '.')}={v}" for k, v in overrides.items()]
  before = _snapshot(workdir)
  one_line_error(run_cli(TINY, f"--workdir={workdir}", *args, env=ONE_DEVICE), f"{named}:3:")
  assert _snapshot(workdir) == before


# --- Fine-tuning from a gptjax run ------------------------------------------------------------


@pytest.mark.slow
def test_init_from_a_workdir_takes_its_weights_shape_and_vocabulary(tmp_path, trained_tiny):
  data = _small_jsonl(tmp_path, 100)
  args = [
    TINY,
    *TASK,
    f"--config.data.path={data}",
    "--config.train.num_steps=3",
    "--config.train.log_every=1",
    "--config.train.eval_every=3",
  ]
  source = _config(trained_tiny)
  source_files = _snapshot(trained_tiny)
  conflicting = tiny_config(init_from=str(trained_tiny), model__n_layer=3)  # weights have 2
  with pytest.raises(UserError, match=re.escape("pass --config.model.n_layer=2 (not 3), or")):
    inference.adopt_init_from(conflicting)  # never silently replaced
  tuned = run_cli(
    *args, f"--config.init_from={trained_tiny}", f"--workdir={tmp_path}/tuned", env=ONE_DEVICE
  )
  assert tuned.returncode == 0, tuned.stderr[-2000:]
  assert f"initialised the parameters from {trained_tiny} (checkpoint 30)" in tuned.stdout
  assert f"from init_from {trained_tiny}: model.vocab_size None -> " in tuned.stdout
  config = _config(tmp_path / "tuned")
  for key in ("n_layer", "n_head", "d_model", "d_ff", "block_size", "vocab_size"):
    assert config["model"][key] == source["model"][key], key
  assert config["init_from"] == str(trained_tiny)
  with (
    open(tmp_path / "tuned" / "tokenizer.json", "rb") as a,
    open(trained_tiny / "tokenizer.json", "rb") as b,
  ):
    assert a.read() == b.read()  # the source's vocabulary, not one built from the task data
  assert _snapshot(trained_tiny) == source_files  # the source run is only read

  fresh = run_cli(*args, f"--workdir={tmp_path}/fresh", env=ONE_DEVICE)
  assert fresh.returncode == 0, fresh.stderr[-2000:]
  assert "initialised the parameters" not in fresh.stdout
  # Step 1's loss is that of the starting weights: the pretrained ones already know the text.
  assert _losses(tmp_path / "tuned")[1] < _losses(tmp_path / "fresh")[1] - 0.3


def test_init_from_a_missing_directory_is_named_before_anything_is_written(tmp_path, small_data):
  config = tiny_config(data__source="task", data__path=small_data, init_from="/nonexistent")
  with pytest.raises(UserError, match="init_from '/nonexistent' is not a gptjax run"):
    loop.train_and_evaluate(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_the_gpt2_recipe_fine_tunes_a_hugging_face_gpt2_with_its_bpe(tmp_path):
  """experiments/gpt2_sft.py: init_from=hf:DIR (a random GPT-2 saved by transformers, with a
  BPE tokenizer.json), the gpt2 template (turns ended by <|endoftext|>), packed task data."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from gptjax import tokenizer as tokenizer_lib

  with open(os.path.join(DIALOGUE, "train.jsonl")) as f:
    text = " ".join(json.loads(line)["messages"][-1]["content"] for line in f)
  bpe = tokenizer_lib.BPETokenizer.train([text[:100_000]], 300)
  torch.manual_seed(0)
  config = transformers.GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=2)
  transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "hf")
  (tmp_path / "hf" / "tokenizer.json").write_text(bpe.hf_json)
  proc = run_cli(
    "--config=experiments/gpt2_sft.py:small",
    *("--config.model.n_layer=2", "--config.model.n_head=2", "--config.model.d_model=32"),
    "--config.model.block_size=64",
    f"--config.init_from=hf:{tmp_path / 'hf'}",
    f"--config.data.path={_small_jsonl(tmp_path, 300)}",
    *("--config.train.batch_size=8", "--config.optim.grad_accum=2"),
    *("--config.train.num_steps=3", "--config.train.eval_every=3", "--config.train.eval_batches=2"),
    f"--workdir={tmp_path / 'w'}",
    env=ONE_DEVICE,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert f"initialised the parameters from hf:{tmp_path / 'hf'}" in proc.stdout
  assert "train task data: 300 conversations in" in proc.stdout
  assert json.load(open(tmp_path / "w" / "config.json"))["data"]["chat_template"] == "gpt2"


@pytest.mark.slow
def test_a_run_keeps_its_template_file_and_chat_uses_that_copy(tmp_path):
  """Chat and evaluation render exactly what training did, even after the file changes."""
  template = tmp_path / "turns.jinja"
  template.write_text(
    "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
  )
  c = tiny_config(
    data__source="task",
    data__path=_small_jsonl(tmp_path, 40),
    data__chat_template=str(template),
    train__num_steps=2,
    train__eval_every=2,
  )
  workdir = tmp_path / "run"
  loop.train_and_evaluate(c, str(workdir))
  trained = template.read_text()
  template.write_text("changed {{ messages }}")
  loaded = inference.load(str(workdir))
  assert loaded.config.data.chat_template == str(workdir / chat_template.SAVED)
  assert (workdir / chat_template.SAVED).read_text() == trained
  out_dir, _ = export.export(str(workdir))
  assert (tmp_path / "run" / "export" / chat_template.SAVED).read_text() == trained
  assert out_dir == str(workdir / "export")


@pytest.mark.slow
def test_a_run_never_resumes_onto_other_data(tmp_path):
  """A task run in a text run's workdir, or a resumed task run whose template file changed,
  is refused before anything in the workdir changes."""
  workdir = tmp_path / "run"
  loop.train_and_evaluate(tiny_config(train__num_steps=2, train__eval_every=2), str(workdir))
  config_json = (workdir / "config.json").read_text()
  data = _small_jsonl(tmp_path, 40)
  task = dict(data__source="task", data__path=data, train__num_steps=4, train__eval_every=2)
  with pytest.raises(UserError, match=r"holds a run trained on other data \(source 'text' -> "):
    loop.train_and_evaluate(tiny_config(**task), str(workdir))
  assert (workdir / "config.json").read_text() == config_json
  template = tmp_path / "t.jinja"
  template.write_text(chat_template.BUILTIN["plain"])
  task.update(data__chat_template=str(template), train__num_steps=2)
  loop.train_and_evaluate(tiny_config(**task), str(workdir / "task"))
  template.write_text(chat_template.BUILTIN["plain"].replace("\n\n", "\n---\n"))
  task.update(train__num_steps=4)
  with pytest.raises(UserError, match=r"other data \(chat_template '.*t.jinja \(sha256 "):
    loop.train_and_evaluate(tiny_config(**task), str(workdir / "task"))

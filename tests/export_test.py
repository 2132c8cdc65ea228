"""--mode=export's target (gptjax or Hugging Face): never a run (its own workdir included)
nor another run's export, and an export is not exported again; readers leave a save in
flight alone; a finished run's record is kept, and a resume onto other data is refused
before anything is prepared. (What an export holds and how it loads: checkpoint_test and
quantize_test.)"""

import json
import shutil

import pytest
from conftest import tiny_config

from gptjax import export, inference, loop
from gptjax.errors import UserError

pytestmark = pytest.mark.slow  # restores a trained run's checkpoint


def _files(directory):
  return {p.relative_to(directory): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def test_an_export_never_writes_over_a_run_or_another_runs_export(trained_tiny, tmp_path):
  a, b = tmp_path / "a", tmp_path / "b"
  shutil.copytree(trained_tiny, a)
  shutil.copytree(trained_tiny, b)
  before = _files(b)
  quiet = lambda *_: None
  with pytest.raises(UserError, match=f"--export_dir={b} holds a training run"):
    export.export(str(a), str(b), warn=quiet)
  with pytest.raises(UserError, match="is the run's own workdir; leave the flag out"):
    export.export(str(a), str(a), warn=quiet)
  assert _files(b) == before and not (a / "params").exists()
  theirs = tmp_path / "theirs"  # a directory of the user's: its params/ was replaced
  (theirs / "params").mkdir(parents=True)
  (theirs / "params" / "notes.txt").write_text("mine")
  with pytest.raises(UserError, match=f"--export_dir={theirs} is not empty \\(it holds params\\)"):
    export.export(str(a), str(theirs), warn=quiet)
  assert (theirs / "params" / "notes.txt").read_text() == "mine"
  out, _ = export.export(str(a), warn=quiet)
  export.export(str(a), warn=quiet)  # its own export: written again
  shutil.copytree(a, tmp_path / "moved")  # its export says it came from a: still its own
  export.export(str(tmp_path / "moved"), warn=quiet)
  with pytest.raises(UserError, match=f"holds an export of {a}; delete it or name another"):
    export.export(str(b), out, warn=quiet)
  with pytest.raises(UserError, match=f"is an export, not a run; export from the run's workdir: --workdir={a}$"):  # fmt: skip
    export.export(out, warn=quiet, weights="int8")


def test_a_hugging_face_export_never_writes_over_a_run_or_another_export(trained_tiny, tmp_path):
  a, b = tmp_path / "a", tmp_path / "b"
  shutil.copytree(trained_tiny, a)
  shutil.copytree(trained_tiny, b)
  before, quiet = _files(b), lambda *_: None
  with pytest.raises(UserError, match=f"--export_dir={b} is not empty .* new or empty directory"):
    export.export_hf(str(a), str(b))
  with pytest.raises(UserError, match="is the run's own workdir; leave the flag out"):
    export.export_hf(str(a), str(a))
  ours, _ = export.export(str(a), warn=quiet)
  with pytest.raises(UserError, match=f"--export_dir={ours} is not empty"):
    export.export_hf(str(a), ours)
  out = export.export_hf(str(a))
  (tmp_path / "a" / "export_hf" / "tokenizer.json").write_text("{}")  # an older BPE export's
  assert export.export_hf(str(a)) == out  # its own: written again, with nothing stale left
  assert sorted(p.name for p in (a / "export_hf").iterdir()) == [
    "config.json",
    "export.json",
    "model.safetensors",
  ]
  with pytest.raises(UserError, match=f"it holds an export of {a}\\)"):
    export.export_hf(str(b), out)
  with pytest.raises(UserError, match=f"--export_dir={out} holds a Hugging Face export"):
    export.export(str(a), out, warn=quiet)
  assert _files(b) == before


def test_sample_and_export_leave_a_save_in_flight_alone(trained_tiny, tmp_path):
  # A reader's orbax manager cleaned up temporary directories: the save of a run training
  # there vanished under it, and the run died.
  run = tmp_path / "run"
  shutil.copytree(trained_tiny, run)
  in_flight = run / "checkpoints" / "31.orbax-checkpoint-tmp"
  (in_flight / "params").mkdir(parents=True)
  assert inference.load(str(run)).where == "checkpoint 30"
  export.export(str(run), warn=lambda *_: None)
  assert (in_flight / "params").is_dir()


def test_a_rerun_keeps_the_runs_config_and_its_vocabulary(trained_tiny, tmp_path):
  run = tmp_path / "run"
  shutil.copytree(trained_tiny, run)
  trained = (run / "config.json").read_text()
  summary = loop.train_and_evaluate(tiny_config(train__num_steps=10, optim__lr=1e-2), str(run))
  assert summary["steps"] == 30 and (run / "config.json").read_text() == trained
  # SIGTERM during the last eval (or a kill before the summary): "nothing to do" for ever.
  meta = run / "checkpoints" / "30" / "meta" / "metadata"
  meta.write_text(json.dumps({**json.loads(meta.read_text()), "eval_owed": True}))
  (run / "summary.json").unlink()
  summary = loop.train_and_evaluate(tiny_config(train__num_steps=30), str(run))
  assert summary["final_val_loss"] > 0 and (run / "summary.json").exists()
  lines = (run / "metrics.jsonl").read_text()
  assert loop.train_and_evaluate(tiny_config(train__num_steps=30), str(run)) == summary
  assert (run / "metrics.jsonl").read_text() == lines  # the eval is owed once, not for ever
  # A deleted or replaced tokenizer.json resumed on ids that meant other characters.
  vocabulary = json.loads((run / "tokenizer.json").read_text())  # 65 of 128 rows: 66 fit too
  (run / "tokenizer.json").write_text(
    json.dumps({**vocabulary, "chars": vocabulary["chars"] + "#"})
  )
  with pytest.raises(UserError, match="checkpoint 30 in .* was trained with another vocabulary"):
    loop.train_and_evaluate(tiny_config(train__num_steps=40), str(run))


def test_a_resume_onto_other_data_is_refused_before_preparing_anything(
  trained_tiny, tmp_path, monkeypatch
):
  """From the newest checkpoint's meta: no data preparation, no compile (minutes for a large
  model). A run without a readable checkpoint takes the full path."""
  run = tmp_path / "run"
  shutil.copytree(trained_tiny, run)

  def prepare(*args, **kwargs):
    raise AssertionError("prepared")

  monkeypatch.setattr(loop, "prepare", prepare)
  task = tiny_config(train__num_steps=40, data__source="task", data__path="chats.jsonl")
  with pytest.raises(UserError, match="holds a run trained on other data"):
    loop.train_and_evaluate(task, str(run))
  other = tmp_path / "other.txt"  # text: another file (was resumed without a word)
  other.write_text(open(tiny_config().data.path).read()[-60_000:])
  with pytest.raises(UserError, match=f"other data \\(path .* -> '{other}', bytes .* -> 60000\\)"):
    loop.train_and_evaluate(tiny_config(train__num_steps=40, data__path=str(other)), str(run))
  for step in (run / "checkpoints").iterdir():
    (step / "meta" / "metadata").write_text("{")  # cut short: restore_or_init decides
  with pytest.raises(AssertionError, match="prepared"):
    loop.train_and_evaluate(task, str(run))

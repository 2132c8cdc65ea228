"""What a resumed run says about settings that differ from its checkpoint's run. (Shapes
that do not fit the checkpoint are refused: checkpoint_test.)"""

import shutil

import pytest
from conftest import tiny_config

from gptjax import checkpoint_compat, loop


def test_training_changes_name_what_shapes_training_and_skip_the_rest():
  saved = {"seed": 0, "optim": {"lr": 3e-3, "b2": 0.99}, "model": {"remat": "none"},
           "train": {"batch_size": 4}}  # fmt: skip
  now = {
    "seed": 1,  # the seed and batch size: data.position_changes warns of those, once
    "optim": {"lr": 1e-3, "b2": 0.99, "new_key": 1},  # a key of a newer version: skipped
    "model": {"remat": "dots"},  # how the model computes, not what
    "train": {"num_steps": 99, "batch_size": 8},  # and the step count grows on a resume
  }
  assert checkpoint_compat.training_changes(saved, now) == ["optim.lr 0.003 -> 0.001"]
  assert checkpoint_compat.training_changes({}, now) == []  # a checkpoint without a config
  # A longer run stretches the schedule when decay_steps is unset (it follows num_steps).
  saved, now = ({"optim": {"decay_steps": None}, "train": {"num_steps": n}} for n in (10, 20))
  assert checkpoint_compat.training_changes(saved, now) == [
    "optim.decay_steps 10 -> 20 (unset, it follows train.num_steps: pass the old value to "
    "keep the schedule)"
  ]
  now["optim"]["decay_steps"] = 10  # as the old run's: the same schedule, nothing to say
  assert checkpoint_compat.training_changes(saved, now) == []


@pytest.mark.slow  # resumes a trained run
def test_a_resume_with_another_learning_rate_says_so(trained_tiny, tmp_path, capsys):
  run = tmp_path / "run"
  shutil.copytree(trained_tiny, run)
  loop.train_and_evaluate(tiny_config(train__num_steps=31, optim__lr=0.5), str(run))
  out = capsys.readouterr().out
  assert "warning: resuming with optim.lr 0.003 -> 0.5; config.json records the new value" in out

"""Every experiment file's every documented variant is a valid config; a bad variant name is a
UserError that names the ones there are."""

import glob
import importlib.util
import os

import pytest
from conftest import REPO

from gptjax import config as config_lib
from gptjax import optim, sweep
from gptjax.errors import UserError

EXPERIMENTS = os.path.join(REPO, "experiments")
# file -> the variants its docstring documents (None: get_config() with no argument)
VARIANTS = {
  "tiny.py": [None],
  "shakespeare_char.py": [None, "gpu", "cpu"],
  "gpt2.py": [None, "small", "medium", "large", "xl"],
  "shakespeare_ablation.py": [None, "product"],
  "shakespeare_dialogue.py": [None],
  "gpt2_sft.py": [None, "small", "medium", "large", "xl"],
}


def _load(name):
  spec = importlib.util.spec_from_file_location(f"_experiment_{name[:-3]}", _path(name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _path(name):
  return os.path.join(EXPERIMENTS, name)


def test_every_experiment_file_is_listed():
  assert sorted(os.path.basename(p) for p in glob.glob(_path("*.py"))) == sorted(VARIANTS)


@pytest.mark.parametrize(
  "name, variant", [(name, v) for name, variants in VARIANTS.items() for v in variants]
)
def test_every_documented_variant_validates(name, variant):
  module = _load(name)
  config = module.get_config() if variant is None else module.get_config(variant)
  config_lib.validate(config)
  if hasattr(module, "get_sweep"):  # and every variant of its sweep, applied to that config
    spec = _path(name) + ("" if variant is None else f":{variant}")
    variants = sweep.load_sweep(spec)
    assert len(variants) == {None: 4, "product": 8}[variant]
    for vname, overrides in variants.items():
      sweep.variant_config(config, vname, overrides)  # validates, or a UserError naming it


def test_the_variants_differ_as_documented():
  char = _load("shakespeare_char.py")
  gpu, cpu = char.get_config(), char.get_config("cpu")
  assert (gpu.model.n_layer, gpu.model.d_model, gpu.model.attn_dropout) == (6, 384, 0.2)
  assert (cpu.model.n_layer, cpu.model.d_model, cpu.model.attn_dropout) == (4, 128, 0.0)
  gpt2 = _load("gpt2.py")
  shapes = {s: gpt2.get_config(s).model for s in ("small", "medium", "large", "xl")}
  assert {s: (m.n_layer, m.n_head, m.d_model) for s, m in shapes.items()} == {
    "small": (12, 12, 768),
    "medium": (24, 16, 1024),
    "large": (36, 20, 1280),
    "xl": (48, 25, 1600),
  }


@pytest.mark.parametrize(
  "name, match",
  [
    ("shakespeare_char.py", "unknown variant 'gpu2' of shakespeare_char.py"),
    ("gpt2.py", "unknown GPT-2 size 'gpu2'; use one of small, medium, large, xl"),
    ("gpt2_sft.py", "unknown GPT-2 size 'gpu2'; use one of small, medium, large, xl"),
    ("shakespeare_ablation.py", "unknown variant 'gpu2' of shakespeare_ablation.py"),
  ],
)
def test_a_bad_variant_name_is_a_user_error(name, match):
  with pytest.raises(UserError, match=match):
    _load(name).get_config("gpu2")


@pytest.mark.parametrize(
  "name, variant", [(name, v) for name, variants in VARIANTS.items() for v in variants]
)
def test_num_steps_drives_the_learning_rate_decay(name, variant):
  """--config.train.num_steps=N alone gives a schedule that ends at min_lr at step N: no
  experiment pins decay_steps to its own step count."""
  module = _load(name)
  config = module.get_config() if variant is None else module.get_config(variant)
  assert config.optim.decay_steps is None, "leave optim.decay_steps to follow num_steps"
  config.train.num_steps = 200
  lr = optim.schedule(config.optim, config.train.num_steps)
  assert float(lr(200)) == pytest.approx(config.optim.min_lr)

"""Config: an old run's config.json upgraded to today's keys; validate() holds every static
check (bad values refused in one line before anything starts)."""

import json

import pytest
from conftest import tiny_config

from gptjax import config as config_lib
from gptjax.errors import UserError


def _old_run(tmp_path) -> dict:
  """A config.json as a run saved it before remat, scan_layers, loss_chunk and the "layers"
  rule existed (and with a key gptjax no longer knows)."""
  saved = config_lib.resolved(tiny_config(), 65)
  for section, key in [("model", "remat"), ("model", "scan_layers"), ("train", "loss_chunk")]:
    del saved[section][key]
  del saved["mesh"]["rules"]["layers"]
  saved["model"]["retired_switch"] = True
  (tmp_path / "config.json").write_text(json.dumps(saved))
  return saved


def test_an_old_config_json_reads_with_todays_defaults(tmp_path):
  saved = _old_run(tmp_path)
  config = config_lib.load_saved(str(tmp_path))
  assert config.model.remat == "none" and config.model.scan_layers is False
  assert config.train.loss_chunk == 0 and config.mesh.rules.layers == ""
  assert "retired_switch" not in config.model
  assert config.model.vocab_size == 65 and config.data.path == saved["data"]["path"]
  config_lib.validate(config)  # every key present: no .get(key, default) anywhere downstream


def test_a_missing_or_broken_config_json_is_one_clear_error(tmp_path):
  with pytest.raises(UserError, match="config.json not found"):
    config_lib.load_saved(str(tmp_path))
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(UserError, match="is not readable JSON .* a crash may have cut it short"):
    config_lib.load_saved(str(tmp_path))


@pytest.mark.parametrize(
  "overrides, fragment",
  [
    ({"optim__b2": 1.5}, "config.optim.b2=1.5 must be in [0.0, 1.0)"),
    ({"optim__lr": -0.1}, "config.optim.lr=-0.1 must be above 0"),
    ({"optim__grad_accum": 3}, "batch_size=8 is not divisible by config.optim.grad_accum=3"),
    ({"cpu_devices": 0}, "config.cpu_devices=0 must be -1 (one per core) or at least 1"),
    ({"model__remat": "all"}, "config.model.remat='all' is not one of none, dots"),
    ({"model__n_head": 3}, "config.model.d_model=32 is not divisible by config.model.n_head=3"),
    ({"train__loss_chunk": 5}, "e.g. --config.train.loss_chunk=32"),
    ({"train__loss_chunk": -1}, "config.train.loss_chunk=-1 must be at least 0"),
    ({"optim__lr": float("nan")}, "is not a finite number"),
    ({"model__d_ff": -3}, "config.model.d_ff=-3 must be at least 1"),  # None is the default
    ({"model__vocab_size": 0}, "config.model.vocab_size=0 must be at least 1"),
    ({"optim__decay_steps": 0}, "config.optim.decay_steps=0 must be at least 1"),
    (
      {"model__norm": "batchnorm"},
      "config.model.norm='batchnorm' is not one of layernorm, rmsnorm",
    ),
    ({"mesh__rules__mlp": "model"}, "names mesh axis 'model'; mesh axes are data, fsdp, tensor"),
    ({"mesh__shape__fsdp": 0}, "sizes must be positive"),
    ({"mesh__shape__data": -1, "mesh__shape__fsdp": -1}, "at most one -1"),
    ({"distributed__timeout_s": 0}, "config.distributed.timeout_s=0 must be above 0"),
    ({"distributed__coordinator_address": "h:1"}, "num_processes, config.distributed.process_id"),
    (
      {
        "distributed__coordinator_address": "h:1",
        "distributed__num_processes": 2,
        "distributed__process_id": 2,
      },
      "process_id=2 must be in [0, num_processes=2)",
    ),
  ],
)
def test_static_checks_live_in_validate(overrides, fragment):
  with pytest.raises(UserError) as e:
    config_lib.validate(tiny_config(**overrides))
  assert fragment in str(e.value)


def test_the_vocabulary_size_is_known_without_data_only_where_no_file_sets_it():
  config = config_lib.default_config()
  assert config_lib.fixed_vocab_size(config) is None  # char: built from the data
  config.data.tokenizer = "byte"
  assert config_lib.fixed_vocab_size(config) == 257
  config.data.tokenizer = "bpe"
  assert config_lib.fixed_vocab_size(config) == 50257
  config.data.tokenizer_path = "/models/other_bpe"  # its own file: read it
  assert config_lib.fixed_vocab_size(config) is None

"""--mode=sample end to end through the inference loader, and its errors as one line each."""

import dataclasses
import re

import jax
import numpy as np
import pytest
from conftest import ONE_DEVICE, one_line_error, run_cli, tiny_config

from gptjax import config as config_lib
from gptjax import decode, export, inference, sharding
from gptjax.errors import UserError


@pytest.mark.slow
def test_sample_prints_continuations_of_the_prompt(trained_tiny):
  proc = run_cli(
    "--mode=sample",
    f"--workdir={trained_tiny}",
    "--prompt=ROMEO:",
    "--num_samples=2",
    "--max_new_tokens=80",
    "--top_k=10",
    env=ONE_DEVICE,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  samples = proc.stdout.split("---------------\n")  # stdout: the samples alone
  assert len(samples) == 3 and all(s.startswith("ROMEO:") for s in samples[:2]) and not samples[2]
  assert "from checkpoint 30" in proc.stderr and "tokens/s" in proc.stderr
  # 80 new tokens beyond the 32-token context: the sliding window refilled the cache
  assert all(len(s) > len("ROMEO:") + 40 or "<|endoftext|>" in s for s in samples[:2])


@pytest.mark.slow
def test_a_prompt_the_tokenizer_cannot_read_is_named(trained_tiny):
  with pytest.raises(UserError) as e:
    inference.sample_text(str(trained_tiny), "caf\u00e9 \u20ac", 1, 5, decode.Sampling(), 0)
  line = str(e.value)
  assert (
    "character '\u00e9' (U+00E9) is not in the char vocabulary"
    " built from the training text: this model cannot read it; remove it from --prompt"
  ) in line and "tokenizer=byte" not in line


@pytest.mark.slow
def test_sample_without_a_checkpoint(tmp_path):
  """The CLI contract of a mode's UserError: one line, exit 1."""
  line = one_line_error(run_cli("--mode=sample", f"--workdir={tmp_path}", env=ONE_DEVICE))
  assert f"{tmp_path} holds no training run" in line and "export/config.json" not in line


def test_a_workdir_without_a_run_is_named(tmp_path):
  with pytest.raises(UserError) as e:
    inference.sample_text(str(tmp_path), "", 1, 5, decode.Sampling(), 0)
  assert f"{tmp_path} holds no training run" in str(e.value)
  assert "export/config.json" not in str(e.value)


@pytest.mark.parametrize(
  "sampling, fragment",
  [
    (decode.Sampling(top_p=1.5), "--top_p=1.5 must be in (0, 1]"),
    (decode.Sampling(temperature=float("nan")), "--temperature=nan must be a finite number >= 0"),
    (decode.Sampling(temperature=-1.0), "temperature=-1.0 must be a finite number >= 0"),
    (decode.Sampling(temperature=float("inf")), "temperature=inf must be a finite number"),
    (decode.Sampling(top_p=float("nan")), "top_p=nan must be in (0, 1]"),
    (decode.Sampling(top_p=0.0), "top_p=0.0 must be in (0, 1]"),
  ],
)
def test_sampling_values_are_checked(sampling, fragment):
  with pytest.raises(UserError, match=re.escape(fragment)):
    sampling.check(64)


@pytest.mark.slow
def test_a_run_loads_onto_a_mesh_as_training_lays_it_out(trained_tiny):
  """inference.load(mesh=...) splits the params by the run's rules table; the values and
  what they decode are those of the one-device load."""
  config = config_lib.load_saved(str(trained_tiny))
  config.mesh.shape.update(dict(data=1, fsdp=4, tensor=2))
  mesh = sharding.make_mesh(config.mesh)
  one, split = inference.load(str(trained_tiny)), inference.load(str(trained_tiny), mesh=mesh)
  assert one.where == split.where == "checkpoint 30"
  assert tuple(split.params["wte"]["embedding"].sharding.spec) == ("tensor", "fsdp")
  for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(split.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  tokens, start = decode.left_pad([one.tokenizer.encode("ROMEO:").tolist()] * 4)
  outs = []
  for run, m in ((one, None), (split, mesh)):
    d = decode.Decoder(run.model, run.params, mesh=m, rules=sharding.rules(config.mesh))
    outs.append(np.asarray(d.generate(d.prefill(tokens, start, 8), 8, decode.Sampling(0.0))[1]))
  np.testing.assert_array_equal(outs[0], outs[1])


def test_init_from_a_run_or_its_export_gives_the_same_params_in_any_layer_layout(
  trained_tiny, tmp_path
):
  """A fine-tuning run's starting point: a workdir's newest checkpoint, or its export alone
  (params + config.json + tokenizer.json), stacked for scan_layers when the new run scans."""
  export.export(str(trained_tiny), str(tmp_path / "export"))
  run = inference.load(str(trained_tiny))
  from_run, where_run = inference.init_from(str(trained_tiny), run.model.cfg)
  from_export, where_export = inference.init_from(str(tmp_path / "export"), run.model.cfg)
  assert where_run.endswith("(checkpoint 30)") and where_export.endswith("(export)")
  jax.tree.map(np.testing.assert_array_equal, from_run, from_export)
  scanned = dataclasses.replace(run.model.cfg, scan_layers=True)
  stacked, _ = inference.init_from(str(tmp_path / "export"), scanned)
  np.testing.assert_array_equal(
    stacked["h"]["mlp"]["up"]["kernel"][1], from_run["h_1"]["mlp"]["up"]["kernel"]
  )
  config = config_lib.default_config()
  config.init_from = str(tmp_path / "export")
  changes = inference.adopt_init_from(config)  # the shape and vocabulary of the source
  assert config.model.n_layer == run.model.cfg.n_layer and "model.n_layer 12 -> 2" in changes
  assert config.model.vocab_size == run.model.cfg.vocab_size


def test_a_config_beside_a_trained_run_or_without_weights_is_refused(trained_tiny, tmp_path):
  with pytest.raises(UserError, match="holds a trained run, which brings its own config"):
    inference.load(str(trained_tiny), tiny_config())
  with pytest.raises(UserError, match="--config names no weights without --config.init_from"):
    inference.load(str(tmp_path), tiny_config())
  loaded = inference.load(str(tmp_path), tiny_config(init_from=str(trained_tiny)))
  assert loaded.where == "checkpoint 30"  # a gptjax run as init_from: its own weights
  # The config's model keys were ignored without a word: a shape is checked, int8 is made.
  with pytest.raises(UserError, match="weights fix these: pass --config.model.n_layer=2 \\(not 3"):
    inference.load(str(tmp_path), tiny_config(init_from=str(trained_tiny), model__n_layer=3))
  int8 = tiny_config(init_from=str(trained_tiny), model__quant="int8", model__kv_quant="int8")
  loaded = inference.load(str(tmp_path), int8)
  assert (loaded.model.cfg.quant, loaded.model.cfg.kv_quant) == ("int8", "int8")


def test_sample_prints_only_the_samples_on_stdout(trained_tiny, capsys):
  """Results on stdout, notes and timing on stderr: `> out.txt` keeps the text alone."""
  texts = inference.sample_text(str(trained_tiny), "ROMEO:", 2, 10, decode.Sampling(0.0), seed=0)
  captured = capsys.readouterr()
  assert captured.out == "".join(f"{t}\n---------------\n" for t in texts)
  assert "tokens/s" in captured.err and "from checkpoint 30" in captured.err


def test_a_script_loads_a_run_by_a_relative_path_or_tilde(trained_tiny, monkeypatch, tmp_path):
  """inference.load is the API scripts call with their arguments as typed (scripts/
  int8_quality.py runs/shakespeare_cpu): a relative path or ~ works as the CLI's does."""
  monkeypatch.chdir(trained_tiny.parent)
  rel = inference.load(trained_tiny.name)
  monkeypatch.setenv("HOME", str(trained_tiny.parent))
  home = inference.load(f"~/{trained_tiny.name}")
  assert rel.where == home.where == "checkpoint 30"

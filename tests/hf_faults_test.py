"""What gptjax cannot import from a Hugging Face directory is one line naming the file (or the
model type), before any data or compile; torch.load is never told to unpickle anything."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
import transformers
from conftest import ONE_DEVICE, one_line_error, run_cli
from hf_test import HEADS, SHAPE, VOCAB, D, _config

from gptjax import hf
from gptjax.errors import UserError


def _broken(kind, src, dst):
  """An HF directory broken one way, from the good one at src."""
  os.makedirs(dst)
  config = (src / "config.json").read_text()
  weights = (src / "model.safetensors").read_bytes()
  if kind == "config_not_json":
    (dst / "config.json").write_text(config[: len(config) // 2])
    (dst / "model.safetensors").write_bytes(weights)
    return
  (dst / "config.json").write_text(config)
  if kind == "safetensors_garbage":
    (dst / "model.safetensors").write_bytes(b"not a safetensors file" * 10)
  elif kind == "safetensors_truncated":
    (dst / "model.safetensors").write_bytes(weights[: len(weights) // 2])
  elif kind == "bin_garbage":
    (dst / "pytorch_model.bin").write_bytes(b"not a pickle" * 10)
  elif kind == "missing_shard":
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    (dst / shards[0]).write_bytes(weights)
    (dst / "model.safetensors.index.json").write_text(
      json.dumps(
        {
          "metadata": {},
          "weight_map": {"transformer.wte.weight": shards[0], "transformer.wpe.weight": shards[1]},
        }
      )
    )
  elif kind == "refused_option":
    (dst / "config.json").write_text(
      json.dumps({**json.loads(config), "scale_attn_by_inverse_layer_idx": True})
    )
    (dst / "model.safetensors").write_bytes(weights)


BROKEN = [
  (
    "no_weights",
    [
      "has config.json but no weights",
      "model.safetensors,",
      "model.safetensors.index.json",
      "pytorch_model.bin",
    ],
  ),
  ("safetensors_garbage", ["model.safetensors is not a readable safetensors file"]),
  ("safetensors_truncated", ["model.safetensors is not a readable safetensors file"]),
  ("bin_garbage", ["pytorch_model.bin is not a readable PyTorch state dict"]),
  ("config_not_json", ["config.json is not readable JSON"]),
  (
    "missing_shard",
    ["model.safetensors.index.json names shard model-00002-of-00002.safetensors"],
  ),
  ("refused_option", ["sets scale_attn_by_inverse_layer_idx=True"]),
]


@pytest.mark.parametrize("kind, fragments", BROKEN)
def test_a_broken_hf_directory_is_named(saved_safetensors, tmp_path, kind, fragments):
  """hf.directory, which training and sampling call on --config.init_from first: cheap (the
  config and the weight files' headers), naming the file."""
  hf_dir = tmp_path / "hf"
  _broken(kind, saved_safetensors[1], hf_dir)
  with pytest.raises(UserError) as e:
    hf.directory(f"hf:{hf_dir}", _config().model)
  line = " ".join(str(e.value).split())  # as cli.fail prints it
  for fragment in (str(hf_dir), *fragments):
    assert fragment in line, line
  assert "weights_only" not in line  # torch's advice to unpickle anything: never


@pytest.mark.slow
def test_a_broken_hf_directory_fails_fast_in_one_line(saved_safetensors, tmp_path):
  """Before the data is tokenized (WORKDIR/data) or a step compiled, naming the file."""
  kind, fragments = BROKEN[0]
  hf_dir, workdir = tmp_path / "hf", tmp_path / "run"
  _broken(kind, saved_safetensors[1], hf_dir)
  proc = run_cli(
    "--config=experiments/tiny.py",
    *SHAPE,
    f"--config.init_from=hf:{hf_dir}",
    f"--workdir={workdir}",
    "--config.train.num_steps=1",
    env=ONE_DEVICE,
  )
  one_line_error(proc, str(hf_dir), *fragments)
  assert "weights_only" not in proc.stderr  # torch's advice to unpickle anything: never
  assert not (workdir / "data").exists() and not (workdir / "tokenizer.json").exists()


def test_a_model_that_is_not_gpt2_is_named(tmp_path):
  config = transformers.LlamaConfig(
    vocab_size=VOCAB,
    hidden_size=D,
    intermediate_size=128,
    num_hidden_layers=1,
    num_attention_heads=HEADS,
  )
  transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
  with pytest.raises(UserError, match="holds a LlamaForCausalLM model .*not GPT-2"):
    hf.directory(f"hf:{tmp_path}")
  with pytest.raises(UserError, match="no config.json"):
    hf.directory(f"hf:{tmp_path / 'nothing'}")


def test_pytorch_model_bin_formats(saved_safetensors, tmp_path):
  """torch.save's legacy format reads; what weights_only torch.load refuses (a pickled module)
  or what is no state dict is one line, never with torch's advice to unpickle anything."""
  hf_model, path = saved_safetensors
  shutil.copy(path / "config.json", tmp_path)
  binary = tmp_path / "pytorch_model.bin"
  torch.save(hf_model.state_dict(), binary, _use_new_zipfile_serialization=False)
  hf.directory(f"hf:{tmp_path}")
  want = {k: v.numpy() for k, v in hf_model.state_dict().items()}
  got = hf.read_tensors(str(tmp_path))
  assert sorted(got) == sorted(k.removeprefix("transformer.") for k in want)
  np.testing.assert_array_equal(got["wte.weight"], want["transformer.wte.weight"])
  for obj, match in [
    (hf_model, r"not a pickled dict of tensors\); re-save"),
    ({"model": hf_model.state_dict()}, "holds a dict, not a state dict"),
  ]:
    torch.save(obj, binary)
    hf.directory(f"hf:{tmp_path}")  # a zip archive: only loading tells
    with pytest.raises(UserError, match=f"pytorch_model.bin .*{match}") as e:
      hf.read_tensors(str(tmp_path))
    assert "weights_only" not in str(e.value)

"""Hugging Face GPT-2 interop against models built here (random weights, torch 2.13 CPU)."""

import json

import numpy as np
import pytest
import torch  # the test extra installs torch (CPU) and transformers
import transformers

from conftest import ONE_DEVICE, SHAKESPEARE_DIR as SHAKESPEARE, run_cli, tiny_config
from gptjax import decode, hf
from gptjax.errors import UserError
from gptjax.model import GPT, GPTConfig

VOCAB, D, LAYERS, HEADS, POSITIONS = 96, 64, 2, 4, 64


def _hf_model(seed=0, **overrides):
  torch.manual_seed(seed)
  config = transformers.GPT2Config(
      vocab_size=VOCAB, n_positions=POSITIONS, n_embd=D, n_layer=LAYERS, n_head=HEADS,
      bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1,
      initializer_range=0.2, **overrides)  # larger weights: sharper logits, fewer near-ties
  return transformers.GPT2LMHeadModel(config).eval()


def _config(**overrides):
  c = tiny_config(model__n_layer=LAYERS, model__n_head=HEADS, model__d_model=D,
                  model__block_size=POSITIONS, model__vocab_size=VOCAB)
  for key, value in overrides.items():
    c.model[key] = value
  return c


@pytest.fixture(scope="module", params=["safetensors", "bin"])
def saved(request, tmp_path_factory):
  model = _hf_model()
  path = tmp_path_factory.mktemp(f"hf_{request.param}")
  model.save_pretrained(path, safe_serialization=request.param == "safetensors")
  return model, path


@pytest.fixture(scope="module")
def saved_safetensors(tmp_path_factory):
  """One saved model for the CLI tests (the file formats are covered by `saved`)."""
  model = _hf_model()
  path = tmp_path_factory.mktemp("hf_cli")
  model.save_pretrained(path, safe_serialization=True)
  return model, path


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


def _gptjax(path, **overrides):
  cfg = GPTConfig.from_config(_config(**overrides).model, VOCAB)
  return GPT(cfg), hf.load_params(f"hf:{path}", cfg)


TOKENS = np.random.default_rng(0).integers(0, VOCAB, (3, 40)).astype(np.int32)


def test_import_matches_transformers_logits(saved):
  hf_model, path = saved
  model, params = _gptjax(path)
  ours = np.asarray(model.apply({"params": params}, TOKENS))[..., :VOCAB]
  theirs = _hf_logits(hf_model, TOKENS)
  assert np.abs(ours - theirs).max() < 1e-4 * max(1.0, np.abs(theirs).max())


def test_export_loads_in_transformers_unchanged(saved, tmp_path):
  hf_model, path = saved
  model, params = _gptjax(path)
  hf.save(params, model.cfg, str(tmp_path))
  again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
  theirs, back = _hf_logits(hf_model, TOKENS), _hf_logits(again, TOKENS)
  assert np.abs(back - theirs).max() < 1e-4 * max(1.0, np.abs(theirs).max())
  assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [
      "GPT2LMHeadModel"]


def test_greedy_generation_equals_transformers_generate(saved):
  hf_model, path = saved
  model, params = _gptjax(path)
  prompt = np.random.default_rng(1).integers(0, VOCAB - 1, (2, 16))
  with torch.no_grad():
    theirs = hf_model.generate(torch.tensor(prompt), do_sample=False, max_new_tokens=32,
                               min_new_tokens=32, attention_mask=torch.ones(prompt.shape),
                               pad_token_id=VOCAB - 1).numpy()[:, 16:]
  d = decode.Decoder(model, params)
  tokens, start = decode.left_pad(prompt.tolist())
  _, ours, count = d.generate(d.prefill(tokens, start, 32), 32, decode.Sampling(0.0))
  assert list(np.asarray(count)) == [32, 32]
  np.testing.assert_array_equal(np.asarray(ours), theirs)


def test_a_model_that_is_not_gpt2_is_named(tmp_path):
  config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=128,
                                    num_hidden_layers=1, num_attention_heads=HEADS)
  transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
  with pytest.raises(UserError, match="holds a LlamaForCausalLM model .*not GPT-2"):
    hf.directory(f"hf:{tmp_path}")
  with pytest.raises(UserError, match="no config.json"):
    hf.directory(f"hf:{tmp_path / 'nothing'}")


def test_shape_mismatch_names_the_tensor(saved):
  _, path = saved
  cfg = GPTConfig.from_config(_config(d_model=128).model, VOCAB)
  with pytest.raises(UserError, match=r"transformer.wte.weight has shape \(96, 64\) but the "
                                      r"config needs \(96, 128\)"):
    hf.load_params(f"hf:{path}", cfg)
  with pytest.raises(UserError, match="checkpoint has 2 layers .*n_layer=1"):
    hf.load_params(f"hf:{path}", GPTConfig.from_config(_config(n_layer=1).model, VOCAB))
  with pytest.raises(UserError, match="config.model.norm='rmsnorm', but GPT-2 weights need"):
    hf.load_params(f"hf:{path}", GPTConfig.from_config(_config(norm="rmsnorm").model, VOCAB))


def test_init_from_trains_and_exports_through_the_cli(saved_safetensors, tmp_path):
  """--config.init_from=hf:DIR starts training from the weights; export goes back to HF.

  With scan_layers (stacked layers) on the way in and out: the per-layer layout is what
  the other tests here import and export."""
  _, path = saved_safetensors
  common = ["--config=experiments/tiny.py", "--config.model.scan_layers=true",
            f"--config.model.n_layer={LAYERS}",
            f"--config.model.n_head={HEADS}", f"--config.model.d_model={D}",
            f"--config.model.block_size={POSITIONS}", f"--config.model.vocab_size={VOCAB}",
            f"--config.init_from=hf:{path}"]  # char tokens (66 ids) under a 96-id vocabulary
  proc = run_cli(*common, f"--workdir={tmp_path}", "--config.train.num_steps=2",
                 "--config.optim.lr=1e-9", "--config.optim.min_lr=0", env=ONE_DEVICE)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert f"initialised the parameters from hf:{path}" in proc.stdout
  proc = run_cli("--mode=export", "--export_format=hf", f"--workdir={tmp_path}",
                 env=ONE_DEVICE)
  assert proc.returncode == 0, proc.stderr[-2000:]
  back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "export_hf").eval()
  original = transformers.GPT2LMHeadModel.from_pretrained(path).eval()
  # lr 1e-9 for 2 steps: the weights barely move
  assert np.abs(_hf_logits(back, TOKENS) - _hf_logits(original, TOKENS)).max() < 1e-3
  proc = run_cli(*common[:-1], "--config.init_from=hf:/nonexistent", f"--workdir={tmp_path}2",
                 env=ONE_DEVICE)
  assert proc.returncode == 1 and "no config.json" in proc.stderr


def test_sample_from_an_hf_directory_with_its_bpe_tokenizer(tmp_path):
  """--mode=sample --config.init_from=hf:DIR reads the weights and DIR's tokenizer.json."""
  from gptjax import tokenize
  with open(f"{SHAKESPEARE}/input.txt", encoding="utf-8") as f:
    bpe = tokenize.train_bpe([f.read()[:100_000]], 300)
  torch.manual_seed(0)
  model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=300, n_positions=POSITIONS, n_embd=D, n_layer=LAYERS, n_head=HEADS))
  model.save_pretrained(tmp_path / "hf")
  (tmp_path / "hf" / "tokenizer.json").write_text(bpe.hf_json)
  proc = run_cli("--mode=sample", "--config=experiments/gpt2.py:small",
                 f"--config.model.n_layer={LAYERS}", f"--config.model.n_head={HEADS}",
                 f"--config.model.d_model={D}", f"--config.model.block_size={POSITIONS}",
                 f"--config.init_from=hf:{tmp_path / 'hf'}", f"--workdir={tmp_path / 'w'}",
                 "--prompt=ROMEO:", "--max_new_tokens=12", "--temperature=0", env=ONE_DEVICE)
  assert proc.returncode == 0, proc.stderr[-2000:]
  text, info = proc.stdout.split("---------------\n")
  assert text.startswith("ROMEO:") and f"from hf:{tmp_path / 'hf'}" in info


def test_gpt2_options_gptjax_does_not_compute_are_refused(saved, tmp_path):
  _, path = saved
  config = json.loads((path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps(
      {**config, "scale_attn_by_inverse_layer_idx": True}))
  with pytest.raises(UserError, match="sets scale_attn_by_inverse_layer_idx=True"):
    hf.directory(f"hf:{tmp_path}")


def test_scan_layers_imports_and_exports_the_same_model(saved_safetensors, tmp_path):
  hf_model, path = saved_safetensors
  model, params = _gptjax(path, scan_layers=True)
  assert "h" in params and params["h"]["mlp"]["up"]["kernel"].shape == (LAYERS, D, 4 * D)
  theirs = _hf_logits(hf_model, TOKENS)
  ours = np.asarray(model.apply({"params": params}, TOKENS))[..., :VOCAB]
  assert np.abs(ours - theirs).max() < 1e-4 * max(1.0, np.abs(theirs).max())
  hf.save(params, model.cfg, str(tmp_path))
  back = _hf_logits(transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval(), TOKENS)
  assert np.abs(back - theirs).max() < 1e-4 * max(1.0, np.abs(theirs).max())

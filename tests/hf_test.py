"""Hugging Face GPT-2 interop against models built here (random weights, torch 2.13 CPU)."""

import dataclasses
import json
import os
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch  # the test extra installs torch (CPU) and transformers
import transformers
from conftest import ONE_DEVICE, run_cli, tiny_config
from conftest import SHAKESPEARE_DIR as SHAKESPEARE

from gptjax import decode, hf, inference
from gptjax import tokenizer as tokenizer_lib
from gptjax.errors import UserError
from gptjax.model import GPT, GPTConfig

VOCAB, D, LAYERS, HEADS, POSITIONS = 96, 64, 2, 4, 64
SHAPE = [
  f"--config.model.n_layer={LAYERS}",
  f"--config.model.n_head={HEADS}",
  f"--config.model.d_model={D}",
  f"--config.model.block_size={POSITIONS}",
  f"--config.model.vocab_size={VOCAB}",
]  # the CLI flags for _hf_model's shape


def _hf_model(seed=0, **overrides):
  torch.manual_seed(seed)
  config = transformers.GPT2Config(
    vocab_size=VOCAB,
    n_positions=POSITIONS,
    n_embd=D,
    n_layer=LAYERS,
    n_head=HEADS,
    bos_token_id=VOCAB - 1,
    eos_token_id=VOCAB - 1,
    initializer_range=0.2,
    **overrides,
  )  # larger weights: sharper logits, fewer near-ties
  return transformers.GPT2LMHeadModel(config).eval()


def _config(**overrides):
  c = tiny_config(
    model__n_layer=LAYERS,
    model__n_head=HEADS,
    model__d_model=D,
    model__block_size=POSITIONS,
    model__vocab_size=VOCAB,
  )
  for key, value in overrides.items():
    c.model[key] = value
  return c


@pytest.fixture(scope="module", params=["safetensors", "bin"])
def saved(request, tmp_path_factory):
  """A saved model, as model.safetensors or (alone) pytorch_model.bin."""
  model = _hf_model()
  path = tmp_path_factory.mktemp(f"hf_{request.param}")
  if request.param == "safetensors":
    model.save_pretrained(path)
  else:  # transformers 5 writes safetensors whatever safe_serialization says
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    model.config.to_json_file(path / "config.json")
    assert sorted(os.listdir(path)) == ["config.json", "pytorch_model.bin"]
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
  assert [os.path.basename(f) for f in hf.weight_files(str(path))] == [
    n for n in os.listdir(path) if n.endswith((".safetensors", ".bin"))
  ]
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
  assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]


@pytest.mark.slow
def test_greedy_generation_equals_transformers_generate(saved):
  hf_model, path = saved
  model, params = _gptjax(path)
  prompt = np.random.default_rng(1).integers(0, VOCAB - 1, (2, 16))
  with torch.no_grad():
    theirs = hf_model.generate(
      torch.tensor(prompt),
      do_sample=False,
      max_new_tokens=32,
      min_new_tokens=32,
      attention_mask=torch.ones(prompt.shape),
      pad_token_id=VOCAB - 1,
    ).numpy()[:, 16:]
  d = decode.Decoder(model, params)
  tokens, start = decode.left_pad(prompt.tolist())
  _, ours, count = d.generate(d.prefill(tokens, start, 32), 32, decode.Sampling(0.0))
  assert list(np.asarray(count)) == [32, 32]
  np.testing.assert_array_equal(np.asarray(ours), theirs)


def test_shape_mismatch_names_the_tensor(saved):
  _, path = saved
  cfg = GPTConfig.from_config(_config(d_model=128).model, VOCAB)
  with pytest.raises(
    UserError,
    match=r"transformer.wte.weight has shape \(96, 64\) but the "
    r"config needs \(96, 128\)",
  ):
    hf.load_params(f"hf:{path}", cfg)
  with pytest.raises(UserError, match="checkpoint has 2 layers .*n_layer=1"):
    hf.load_params(f"hf:{path}", GPTConfig.from_config(_config(n_layer=1).model, VOCAB))
  with pytest.raises(UserError, match="config.model.norm='rmsnorm', but GPT-2 weights need"):
    hf.load_params(f"hf:{path}", GPTConfig.from_config(_config(norm="rmsnorm").model, VOCAB))


@pytest.mark.slow
def test_init_from_trains_and_exports_through_the_cli(saved_safetensors, tmp_path):
  """--config.init_from=hf:DIR starts training from the weights; export goes back to HF.

  With scan_layers (stacked layers) on the way in and out: the per-layer layout is what
  the other tests here import and export."""
  _, path = saved_safetensors
  common = [
    "--config=experiments/tiny.py",
    "--config.model.scan_layers=true",
    f"--config.model.n_layer={LAYERS}",
    f"--config.model.n_head={HEADS}",
    f"--config.model.d_model={D}",
    f"--config.model.block_size={POSITIONS}",
    f"--config.model.vocab_size={VOCAB}",
    f"--config.init_from=hf:{path}",
  ]  # char tokens (66 ids) under a 96-id vocabulary
  proc = run_cli(
    *common,
    f"--workdir={tmp_path}",
    "--config.train.num_steps=2",
    "--config.optim.lr=1e-9",
    "--config.optim.min_lr=0",
    env=ONE_DEVICE,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert f"initialised the parameters from hf:{path}" in proc.stdout
  proc = run_cli("--mode=export", "--export_format=hf", f"--workdir={tmp_path}", env=ONE_DEVICE)
  assert proc.returncode == 0, proc.stderr[-2000:]
  back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "export_hf").eval()
  original = transformers.GPT2LMHeadModel.from_pretrained(path).eval()
  # lr 1e-9 for 2 steps: the weights barely move
  assert np.abs(_hf_logits(back, TOKENS) - _hf_logits(original, TOKENS)).max() < 1e-3


@pytest.mark.slow
def test_sample_from_an_hf_directory_with_its_bpe_tokenizer(tmp_path):
  """--mode=sample --config.init_from=hf:DIR reads the weights and DIR's tokenizer.json."""

  with open(f"{SHAKESPEARE}/input.txt", encoding="utf-8") as f:
    bpe = tokenizer_lib.BPETokenizer.train([f.read()[:100_000]], 300)
  torch.manual_seed(0)
  model = transformers.GPT2LMHeadModel(
    transformers.GPT2Config(
      vocab_size=300, n_positions=POSITIONS, n_embd=D, n_layer=LAYERS, n_head=HEADS
    )
  )
  model.save_pretrained(tmp_path / "hf")
  (tmp_path / "hf" / "tokenizer.json").write_text(bpe.hf_json)
  proc = run_cli(
    "--mode=sample",
    "--config=experiments/gpt2.py:small",
    f"--config.model.n_layer={LAYERS}",
    f"--config.model.n_head={HEADS}",
    f"--config.model.d_model={D}",
    f"--config.model.block_size={POSITIONS}",
    f"--config.init_from=hf:{tmp_path / 'hf'}",
    f"--workdir={tmp_path / 'w'}",
    "--prompt=ROMEO:",
    "--max_new_tokens=12",
    "--temperature=0",
    env=ONE_DEVICE,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  text, after = proc.stdout.split("---------------\n")
  assert text.startswith("ROMEO:") and not after and f"from hf:{tmp_path / 'hf'}" in proc.stderr
  shape = dict(model__n_layer=LAYERS, model__n_head=HEADS, model__d_model=D, model__d_ff=4 * D)
  config = tiny_config(**shape, model__block_size=POSITIONS, data__tokenizer="bpe")
  config.init_from, config.model.quant = f"hf:{tmp_path / 'hf'}", "int8"  # a traceback before
  loaded = inference.load(str(tmp_path / "w2"), config)
  assert loaded.model.cfg.quant == "int8" and loaded.params["wte"]["embedding"].dtype == "int8"


@pytest.mark.parametrize(
  "key, value",
  [
    ("scale_attn_by_inverse_layer_idx", True),
    ("scale_attn_weights", False),
    ("activation_function", "gelu"),
    ("activation_function", "relu"),
    ("add_cross_attention", True),
  ],
)
def test_gpt2_options_gptjax_does_not_compute_are_refused(saved_safetensors, tmp_path, key, value):
  """Each changes the numbers (gelu: erf, not tanh); reorder_and_upcast_attn does not (it
  upcasts attention scores to float32, as gptjax always does) and imports: see
  test_random_gpt2_configs_import_and_export_exactly."""
  _, path = saved_safetensors
  shutil.copy(path / "model.safetensors", tmp_path)
  config = json.loads((path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**config, key: value}))
  with pytest.raises(UserError, match=f"sets {key}={value!r}, which gptjax's GPT-2 does not"):
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


@pytest.fixture(scope="module")
def saved_untied(tmp_path_factory):
  model = _hf_model(seed=1, tie_word_embeddings=False)
  path = tmp_path_factory.mktemp("hf_untied")
  model.save_pretrained(path)
  return model, path


def test_an_untied_head_imports_and_exports(saved_untied, saved_safetensors, tmp_path):
  """tie_word_embeddings=False: lm_head.weight is the head, in and out."""
  hf_model, path = saved_untied
  theirs = _hf_logits(hf_model, TOKENS)
  for scan in (False, True):
    model, params = _gptjax(path, tie_embeddings=False, scan_layers=scan)
    assert params["lm_head"]["kernel"].shape == (D, model.cfg.padded_vocab)
    ours = np.asarray(model.apply({"params": params}, TOKENS))[..., :VOCAB]
    assert np.abs(ours - theirs).max() < 1e-4 * max(1.0, np.abs(theirs).max())
    out = tmp_path / f"scan_{scan}"
    hf.save(params, model.cfg, str(out))
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    back = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    assert not torch.equal(back.lm_head.weight, back.transformer.wte.weight)
    assert np.abs(_hf_logits(back, TOKENS) - theirs).max() < 1e-4 * max(1.0, np.abs(theirs).max())
  with pytest.raises(
    UserError, match="tie_word_embeddings=False .*pass --config.model.tie_embeddings=false$"
  ):
    _gptjax(path)
  with pytest.raises(
    UserError, match="tie_word_embeddings=True .*pass --config.model.tie_embeddings=true$"
  ):
    _gptjax(saved_safetensors[1], tie_embeddings=False)


def test_an_untied_checkpoint_under_a_tied_config_is_named_before_training(saved_untied):
  """Training checks --config.init_from with hf.directory(DIR, config.model) first."""
  _, path = saved_untied
  with pytest.raises(UserError) as e:
    hf.directory(f"hf:{path}", _config().model)
  assert "tie_word_embeddings=False" in str(e.value)
  assert "--config.model.tie_embeddings=false" in str(e.value)


def test_layer_norm_epsilon_is_read(tmp_path):
  """An eps other than the config's is refused with the flag that matches it (the caller
  built its model from the config), and imports exactly under that flag."""
  hf_model = _hf_model(layer_norm_epsilon=1e-3)
  hf_model.save_pretrained(tmp_path)
  with pytest.raises(
    UserError,
    match=r"layer_norm_epsilon=0.001 but config.model.norm_eps="
    r"1e-05; pass --config.model.norm_eps=0.001$",
  ):
    _gptjax(tmp_path)
  with pytest.raises(UserError, match=r"pass --config.model.norm_eps=0.001$"):
    hf.directory(f"hf:{tmp_path}", _config().model)  # config.model: before any data or compile
  model, params = _gptjax(tmp_path, norm_eps=1e-3)
  theirs = _hf_logits(hf_model, TOKENS)
  ours = np.asarray(model.apply({"params": params}, TOKENS))[..., :VOCAB]
  assert np.abs(ours - theirs).max() < 1e-4 * max(1.0, np.abs(theirs).max())


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.slow
def test_random_gpt2_configs_import_and_export_exactly(seed, tmp_path):
  """Every GPT2Config field that touches the forward pass, at random non-default values (the
  booleans alternate with the seed), matches transformers' logits in and out."""
  rng = np.random.default_rng(seed)
  n_head = int(rng.choice([2, 3, 6]))
  n_embd, vocab = n_head * int(rng.choice([8, 16])), int(rng.integers(70, 200))
  n_positions = int(rng.integers(20, 60))
  fields = dict(
    n_embd=n_embd,
    n_head=n_head,
    n_layer=int(rng.integers(1, 4)),
    vocab_size=vocab,
    n_inner=int(rng.integers(1, 6)) * 24,
    n_positions=n_positions,
    layer_norm_epsilon=float(10 ** rng.uniform(-3.5, -1.5)),  # far enough from 1e-5 to show
    activation_function=("gelu_pytorch_tanh", "gelu_new")[seed % 2],
    tie_word_embeddings=bool(seed % 2),
    reorder_and_upcast_attn=not seed % 2,
    initializer_range=float(rng.uniform(0.1, 0.3)),  # larger weights: sharper logits
    bos_token_id=vocab - 1,
    eos_token_id=vocab - 1,
  )
  torch.manual_seed(seed)
  # eager: the only attention reorder_and_upcast_attn changes
  config = transformers.GPT2Config(attn_implementation="eager", **fields)
  hf_model = transformers.GPT2LMHeadModel(config).eval()
  hf_model.save_pretrained(tmp_path / "in")
  c = tiny_config(
    model__n_layer=fields["n_layer"],
    model__n_head=n_head,
    model__d_model=n_embd,
    model__d_ff=fields["n_inner"],
    model__block_size=n_positions,
    model__vocab_size=vocab,
    model__norm_eps=fields["layer_norm_epsilon"],
    model__tie_embeddings=fields["tie_word_embeddings"],
  )
  cfg = GPTConfig.from_config(c.model, vocab)
  with pytest.raises(
    UserError, match=f"pass --config.model.norm_eps={fields['layer_norm_epsilon']}$"
  ):
    hf.load_params(f"hf:{tmp_path / 'in'}", dataclasses.replace(cfg, norm_eps=1e-5))
  model, params = GPT(cfg), hf.load_params(f"hf:{tmp_path / 'in'}", cfg)
  tokens = np.random.default_rng(seed).integers(0, vocab, (2, n_positions)).astype(np.int32)
  theirs = _hf_logits(hf_model, tokens)
  ours = np.asarray(model.apply({"params": params}, tokens))[..., :vocab]
  assert np.abs(ours - theirs).max() < 1e-4 * max(1.0, np.abs(theirs).max())
  hf.save(params, cfg, str(tmp_path / "out"))
  back = transformers.GPT2LMHeadModel.from_pretrained(
    tmp_path / "out", attn_implementation="eager"
  ).eval()
  assert np.abs(_hf_logits(back, tokens) - theirs).max() < 1e-4 * max(1.0, np.abs(theirs).max())
  written = json.loads((tmp_path / "out" / "config.json").read_text())
  for key in (
    "n_embd",
    "n_head",
    "n_layer",
    "vocab_size",
    "n_inner",
    "n_positions",
    "layer_norm_epsilon",
    "tie_word_embeddings",
  ):
    assert written[key] == fields[key], key


def test_a_bias_free_run_exports_as_gpt2_with_zero_biases(tmp_path):
  """nanoGPT's bias=False (the Shakespeare experiments') is GPT-2 with zero biases: the
  export loads in transformers with the same logits; importing it back into a bias-free
  config is still refused (GPT-2 weights have biases), naming the setting to pass."""
  model = GPT(GPTConfig.from_config(tiny_config(model__bias=False).model, 66))
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), np.zeros((1, 8), np.int32)))["params"]
  hf.save(params, model.cfg, str(tmp_path / "export_hf"))
  exported = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "export_hf").eval()
  tokens = TOKENS[:, :32] % 66
  ours = np.asarray(model.apply({"params": params}, tokens))[..., :66]
  assert np.abs(_hf_logits(exported, tokens) - ours).max() < 1e-4 * max(1.0, np.abs(ours).max())
  with pytest.raises(UserError, match=r"GPT-2 weights need True: set --config.model.bias=True"):
    hf.check_layout(model.cfg)

"""Model FLOPs per token, the peak table and MFU (gptjax/metrics.py)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from conftest import tiny_config

from gptjax import metrics
from gptjax.errors import UserError
from gptjax.model import GPT, GPTConfig, abstract_params


def _cfg(**overrides):
  return GPTConfig.from_config(tiny_config(**overrides).model, 65)


def _count_from_the_param_tree(activation):
  """6 FLOPs per token per matmul weight + attention's 12 L T d, every size read from the
  real model's parameters (not from GPTConfig, which the formula reads)."""
  c = tiny_config(model__activation=activation, model__vocab_size=65)
  params = abstract_params(c)
  assert "lm_head" not in params  # tied: the output head is wte's real rows
  leaves = jax.tree_util.tree_leaves_with_path(params)
  kernels = sum(x.size for path, x in leaves if path[-1].key == "kernel")  # every Dense
  vocab_padded, d = params["wte"]["embedding"].shape
  assert vocab_padded == 128  # padding rows, which are never predicted and must not count
  block_size = params["wpe"]["embedding"].shape[0]
  n_layer = len([k for k in params if k.startswith("h_")])
  return 6 * (kernels + 65 * d) + 12 * n_layer * block_size * d


def test_flops_per_token_matches_a_count_of_the_tiny_models_parameters():
  count = _count_from_the_param_tree("gelu")
  # tiny: 2 x (q, k, v, out 4*32*32 + MLP up, down 2*32*128) + head 65*32 = 26,656 weights;
  # attention: 2 layers x (fwd+bwd) 3 x (QK^T, AV) 2 x 2 T d = 24,576
  assert count == 6 * 26_656 + 24_576 == 184_512
  assert metrics.flops_per_token(_cfg()) == count


def test_flops_per_token_counts_swiglu_three_matrices():
  cfg = _cfg(model__activation="swiglu")
  assert cfg.d_ff == 128  # 8/3 * 32 rounded up to 64
  count = _count_from_the_param_tree("swiglu")
  assert count == 6 * (2 * (4 * 32 * 32 + 3 * 32 * 128) + 65 * 32) + 24_576
  assert metrics.flops_per_token(cfg) == count


def test_flops_per_token_is_a_third_forward_as_xla_counts_it():
  """XLA's own count of the compiled forward pass agrees with formula / 3 (elementwise work,
  softmax and norms add a little on top of the matmuls)."""
  c = tiny_config(model__n_layer=2, model__n_head=4, model__d_model=128, model__block_size=64)
  cfg = GPTConfig.from_config(c.model, 128)  # no vocab padding: XLA sees the real head
  model = GPT(cfg)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64), jnp.int32))
  tokens = jax.ShapeDtypeStruct((2, 64), jnp.int32)
  cost = jax.jit(model.apply).lower(params, tokens).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  ratio = cost["flops"] / (metrics.flops_per_token(cfg) / 3 * 2 * 64)
  assert 1.0 <= ratio < 1.1, ratio


@pytest.mark.parametrize(
  "kind, peak",
  [
    ("NVIDIA H100 80GB HBM3", 989.0),
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H200", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("TPU v4", 275.0),
    ("TPU v5 lite", 197.0),
    ("TPU v5p", 459.0),
    ("TPU v6 lite", 918.0),
    ("cpu", None),
  ],
)
def test_peak_table(kind, peak):
  assert metrics.peak_tflops(kind) == peak


def test_mfu_is_model_flops_per_device_over_the_peak():
  cfg = _cfg()
  tokens_per_s = 989e12 / metrics.flops_per_token(cfg)  # exactly one H100's peak, in total
  speed = metrics.throughput(tokens_per_s, cfg, 4, "NVIDIA H100 80GB HBM3")
  assert speed["tflops"] == pytest.approx(989.0)
  assert speed["mfu"] == pytest.approx(0.25)  # spread over 4 devices
  assert metrics.throughput(tokens_per_s, cfg, 1, "cpu")["mfu"] is None


def test_a_step_that_does_not_fit_is_refused_before_it_runs():
  metrics.check_fits({"peak_estimate": 1024})
  with pytest.raises(UserError, match=r"needs ~1024.0 GiB per device but a device has"):
    metrics.check_fits({"peak_estimate": 1024**4})


def test_the_fit_advice_names_the_switches_the_config_does_not_use_yet():
  config = tiny_config()
  with pytest.raises(UserError, match=r"--config.model.scan_layers=true --config.model.remat=full"):
    metrics.check_fits({"peak_estimate": 1024**4}, config)
  config.model.scan_layers, config.model.remat, config.train.loss_chunk = True, "full", 8
  with pytest.raises(UserError) as refused:
    metrics.check_fits({"peak_estimate": 1024**4}, config)
  assert "scan_layers" not in str(refused.value) and "loss_chunk" not in str(refused.value)
  assert "raise --config.optim.grad_accum (now 1)" in str(refused.value)


@pytest.mark.slow
def test_a_run_starts_without_importing_torch_or_the_text_scorers(tmp_path):
  """Start-up cost: tensorboardX imports torch when it is installed (~1.6 s) and rouge-score
  imports nltk and scipy (~0.7 s); a training run needs neither. torch stays importable."""
  code = f"""
import sys
import gptjax.main
from gptjax import metrics
w = metrics.MetricWriter({str(tmp_path)!r})
w.write(1, {{"loss": 1.0}})
w.close()
print(sorted(m for m in ("torch", "rouge_score", "nltk", "scipy") if m in sys.modules))
import torch
print(torch.tensor([1]).tolist())
"""
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split("\n")[:2] == ["[]", "[1]"], proc.stdout
  assert any(n.startswith("events.out.tfevents.") for n in os.listdir(tmp_path))

import jax
import numpy as np
import pytest
from conftest import tiny_config

from gptjax import optim
from gptjax.model import GPT, GPTConfig
from gptjax.train import init_state


def test_weight_decay_mask_spares_biases_norms_and_embeddings():
  c = tiny_config(model__tie_embeddings=False)
  model = GPT(GPTConfig.from_config(c.model, 50))
  params = init_state(model, optim.make(c.optim, 10), 0).params
  mask = optim.decay_mask(params)
  assert mask["h_0"]["attn"]["query"]["kernel"] and mask["h_0"]["mlp"]["down"]["kernel"]
  assert mask["lm_head"]["kernel"]  # an untied output layer is a matrix like any other
  assert not mask["h_0"]["attn"]["query"]["bias"] and not mask["h_0"]["mlp"]["up"]["bias"]
  assert not mask["h_0"]["ln_1"]["scale"] and not mask["ln_f"]["bias"]
  assert not mask["wte"]["embedding"] and not mask["wpe"]["embedding"]


@pytest.mark.slow
def test_weight_decay_only_moves_masked_params():
  """With zero gradients, AdamW's update is pure decay: only the masked leaves change."""
  c = tiny_config(optim__weight_decay=0.5, optim__warmup_steps=1)
  model = GPT(GPTConfig.from_config(c.model, 50))
  tx = optim.make(c.optim, 10)
  state = init_state(model, tx, 0)
  zeros = jax.tree.map(np.zeros_like, state.params)
  opt_state, update = state.opt_state, jax.jit(tx.update)  # one compile, not eager per leaf
  for _ in range(3):
    updates, opt_state = update(zeros, opt_state, state.params)
  mask = optim.decay_mask(state.params)
  for decays, u in zip(jax.tree.leaves(mask), jax.tree.leaves(updates)):
    assert bool(np.any(u != 0)) == decays


def test_schedule_warmup_then_cosine_to_min_lr():
  c = tiny_config(optim__lr=1e-3, optim__min_lr=1e-4, optim__warmup_steps=10)
  sched = optim.schedule(c.optim, num_steps=100)
  assert float(sched(0)) == 0.0
  assert float(sched(10)) == pytest.approx(1e-3)
  assert float(sched(5)) == pytest.approx(5e-4)
  assert float(sched(100)) == pytest.approx(1e-4)
  assert float(sched(55)) == pytest.approx(5.5e-4, rel=1e-3)  # cosine midpoint

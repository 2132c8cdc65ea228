"""Packing: examples share rows exactly (each example's loss and gradients as if alone), with
positions restarting per example, and over-long conversations fitted by dropping old turns."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import DIALOGUE_DIR, tiny_config

from gptjax import chat_template, packing, task_data
from gptjax import tokenizer as tokenizer_lib
from gptjax.model import GPT, GPTConfig, init_params

VOCAB = 50


def _examples(n=9, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    length = int(rng.integers(4, 20))
    ids = rng.integers(0, VOCAB, length).astype(np.int32)
    out.append((ids, rng.integers(0, 2, length).astype(np.float32)))
  return out


def test_rows_hold_whole_examples_with_their_own_positions():
  examples = _examples()
  p = packing.pack(examples, block_size=32)
  assert p.tokens.shape[1] == 33 and p.truncated == 0
  found = []
  for r in range(p.tokens.shape[0]):
    for s in set(p.segments[r].tolist()) - {0}:
      slots = np.flatnonzero(p.segments[r] == s)
      found.append(p.tokens[r, p.slot_segments[r] == s].tolist())
      assert (np.diff(slots) == 1).all() and p.positions[r, slots].tolist() == list(
        range(len(slots))
      )
      last = slots[-1]  # the example's last input predicts the next example: never trained
      assert p.weights[r, last] == 0
  assert (p.weights[p.segments == 0] == 0).all()  # padding trains nothing
  assert sorted(found) == sorted(ids.tolist() for ids, _ in examples)  # every example, whole


def test_an_over_long_example_loses_its_oldest_context_and_a_long_reply_its_tail():
  ids, weights = np.arange(40, dtype=np.int32), np.zeros(40, np.float32)
  weights[30:] = 1.0  # a 10-token reply after 30 of context: the context's start goes
  p = packing.pack([(ids, weights)], block_size=15)
  assert p.truncated == 1 and p.tokens[0].tolist() == list(range(24, 40))
  weights[10:] = 1.0  # a 30-token reply: one token of context, then the reply's first 15
  p = packing.pack([(ids, weights)], block_size=15)
  assert p.truncated == 1 and p.tokens[0].tolist() == list(range(9, 25))
  assert p.weights[0].tolist() == [1.0] * 15  # every target in the row is the reply's


def test_an_over_long_conversation_keeps_its_last_reply_not_its_first():
  ids, weights = np.arange(100, dtype=np.int32), np.zeros(100, np.float32)
  weights[20:30] = weights[80:] = 1.0  # two replies: the last one is what must survive
  kept, kept_weights = packing.cut(ids, weights, 65)
  assert kept.tolist() == list(range(35, 100)) and kept_weights[-20:].tolist() == [1.0] * 20
  weights[40:] = 1.0  # the last reply alone is longer than the row: its start, as above
  assert packing.cut(ids, weights, 30)[0].tolist() == list(range(39, 69))
  everything = np.ones(100, np.float32)
  everything[0] = 0  # train_on_all: no reply to anchor on, the oldest tokens go
  assert packing.cut(ids, everything, 30)[0].tolist() == list(range(70, 100))


@pytest.mark.slow  # ~4 s: two forward and backward compiles
@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_packed_losses_and_gradients_equal_separate_passes(positions):
  cfg = GPTConfig.from_config(tiny_config(model__positions=positions).model, VOCAB)
  model = GPT(cfg)
  params = jax.tree.map(
    lambda x: x.value if hasattr(x, "value") else x,
    init_params(model, jax.random.PRNGKey(0)),
    is_leaf=lambda x: hasattr(x, "value"),
  )
  examples = _examples()
  p = packing.pack(examples, block_size=cfg.block_size)
  assert p.tokens.shape[0] < len(examples)  # really packed

  def token_losses(params, tokens_BxT1, **kwargs):
    logits = model.apply({"params": params}, tokens_BxT1[:, :-1], **kwargs)[..., :VOCAB]
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens_BxT1[:, 1:])

  example_ids = (p.segments + (p.segments.max() + 1) * np.arange(len(p.tokens))[:, None]).ravel()

  def packed_loss(params):
    per_token = token_losses(
      params, p.tokens, positions_BxT=p.positions, segments_BxT=p.segments
    ) * jnp.asarray(p.weights)
    per_example = jax.ops.segment_sum(per_token.ravel(), example_ids, int(example_ids.max()) + 1)
    return per_token.sum(), per_example

  # Each example alone in its own row from position 0, right-padded (a causal model's tokens
  # never see what follows them; the padding's targets weigh 0): one compile, not one per length.
  alone = np.zeros((len(examples), cfg.block_size + 1), np.int32)
  alone_w = np.zeros((len(examples), cfg.block_size), np.float32)
  for i, (ids, weights) in enumerate(examples):
    alone[i, : len(ids)], alone_w[i, : len(ids) - 1] = ids, weights[1:]

  def separate_loss(params):
    sums = (token_losses(params, alone) * alone_w).sum(axis=1)
    return sums.sum(), sums

  (total_p, per_p), grads_p = jax.jit(jax.value_and_grad(packed_loss, has_aux=True))(params)
  (total_s, per_s), grads_s = jax.jit(jax.value_and_grad(separate_loss, has_aux=True))(params)
  np.testing.assert_allclose(total_p, total_s, rtol=1e-5)
  np.testing.assert_allclose(np.sort(per_p[per_p != 0]), np.sort(per_s[per_s != 0]), rtol=1e-5)
  # float32 sums taken in other orders: within 1e-5 of each element or of the gradient's scale
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads_s))
  for a, b in zip(jax.tree.leaves(grads_p), jax.tree.leaves(grads_s)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * scale)


def test_an_example_that_fits_no_row_fills_a_half_empty_one_keeping_its_reply():
  width = 33
  first = (np.arange(20, dtype=np.int32), np.zeros(20, np.float32))
  reply_w = np.zeros(18, np.float32)
  reply_w[-5:] = 1.0  # the reply: its last 5 tokens
  second = (np.arange(100, 118, dtype=np.int32), reply_w)
  p = packing.pack([first, second], block_size=width - 1)
  assert len(p.tokens) == 1 and p.truncated == 1 and p.members == [[0, 1]]
  kept = p.tokens[0, p.slot_segments[0] == 2]
  assert kept.tolist() == list(range(105, 118))  # its oldest context cut to the 13 free slots
  assert p.weights[0].sum() == 5.0  # every reply token still trained
  whole = packing.pack([first, second], block_size=width - 1, cut_to_fill=False)
  assert len(whole.tokens) == 2 and whole.truncated == 0


@pytest.mark.parametrize("block", [64, 512, 1024])  # 256: 9 of 5,038 rows at 84.4-84.8%
def test_packing_the_dialogue_fixture_fills_every_row(block):
  """Acceptance: at least 85% real tokens in each row (char tokens, the plain template; 64
  is experiments/shakespeare_dialogue.py's block), and every conversation packed."""
  conversations = task_data.read(os.path.join(DIALOGUE_DIR, "train.jsonl"))
  template = chat_template.load("plain")
  texts = [template.render(m) for m in conversations]
  tok = tokenizer_lib.build("char", None, lambda: texts)
  examples = [template.encode(m, tok) for m in conversations]
  p = packing.pack(examples, block)
  assert p.real_share().min() >= 0.85
  whole = packing.pack(examples, block, cut_to_fill=False)
  assert whole.real_share().min() < 0.85 and len(whole.tokens) > len(p.tokens)
  assert p.weights.sum() == whole.weights.sum()  # filling cuts context, never a reply token
  assert sorted(i for row in p.members for i in row) == list(range(len(conversations)))


def test_rows_come_in_the_order_of_their_examples_not_longest_first():
  """The validation loss reads the first eval_batches rows: a subset in file order, not the
  longest conversations that best fit placed first."""
  rng = np.random.default_rng(0)
  examples = [(np.arange(n), np.r_[0, np.ones(n - 1)]) for n in rng.integers(5, 60, 300)]
  p = packing.pack(examples, block_size=64, cut_to_fill=False)
  firsts = [row[0] for row in p.members]
  assert firsts == sorted(firsts) and firsts[0] == 0


def test_cut_leaves_an_example_that_fits_whole():
  ids, weights = np.arange(10, dtype=np.int32), np.ones(10, np.float32)
  kept_ids, kept_weights = packing.cut(ids, weights, 12)
  assert kept_ids.tolist() == ids.tolist() and kept_weights.tolist() == weights.tolist()


def test_best_fit_matches_a_plain_scan_of_every_row():
  """The count tree finds the tightest row as scanning every row would (same room left in
  every row, in the same order), for random lengths."""
  rng = np.random.default_rng(0)
  for width in (7, 33, 257):
    lengths = rng.integers(2, width + 1, 500).tolist()
    rows, room = packing._best_fit(lengths, width)
    assert sorted(e for r in rows for e in r) == list(range(500))
    assert [width - sum(lengths[e] for e in r) for r in rows] == room.tolist()
    scan = []  # the free room of each row, by a plain scan for the tightest fit
    for n in sorted(lengths, reverse=True):
      fits = [i for i, free in enumerate(scan) if free >= n]
      if fits:
        scan[min(fits, key=lambda i: scan[i])] -= n
      else:
        scan.append(width - n)
    assert sorted(scan) == sorted(room.tolist())

"""The serving engine: continuous batching gives the offline decoder's greedy tokens, a
sampled row does not depend on its batch, and nothing compiles after warm-up."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import cache_copies_in_loops, tiny_config

from gptjax import decode, engine, inference, quantize, serve_bench

# Slow tier: each test compiles an engine's programs (every bucket, width and span), 7-45 s
# apiece on the 2-core VM; `python -m pytest tests/engine_test.py` runs them alone.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def loaded(trained_tiny):
  return inference.load(str(trained_tiny))


def _serve(eng, arrivals: dict, rounds: int = 40) -> dict:
  """arrivals: {round: [(slot, prompt, max_new, temperature, top_k, top_p, seed)]} ->
  {slot: tokens}; requests enter between generate calls, at their round."""
  out = {}
  for r in range(rounds):
    for slot, *request in arrivals.get(r, ()):
      eng.insert(slot, *request)
      out[slot] = []
    tokens = eng.generate().tokens
    for slot in out:
      out[slot] += [t for t in tokens[slot] if t >= 0]
  return out


def test_buckets():
  assert engine.buckets(32) == (16, 32) and engine.buckets(1024)[:2] == (16, 32)
  assert engine.buckets(1000)[-2:] == (512, 1000) and engine.buckets(8) == (8,)


def test_staggered_greedy_rows_equal_the_offline_decoder(loaded):
  tok, model = loaded.tokenizer, loaded.model
  eng = engine.Engine(
    model, loaded.params, slots=4, stop_tokens=[tok.eot_id], chunk=3, smallest_span=8
  )
  eng.warm_up()
  compiled = eng.compiles()
  assert compiled == eng.programs()  # what the server announces before warming up
  texts = ["ROMEO:", "First Citizen:\nBefore", "O", "JULIET: What", "KING", "Ay"]
  budgets = [10, 9, 5, 12, 20, 7]
  prompts = [tok.encode(t).tolist() for t in texts]
  arrivals = {0: [(0, prompts[0], budgets[0], 0.0, 0, 1.0, 0)]}
  arrivals[1] = [(1, prompts[1], budgets[1], 0.0, 0, 1.0, 0)]
  arrivals[2] = [(2, prompts[2], budgets[2], 0.0, 0, 1.0, 0), (3, prompts[3], 12, 0.0, 0, 1.0, 0)]
  got = _serve(eng, arrivals, rounds=8)
  # slot 2 finished early (5 tokens): a new request takes it while the others run on
  eng.insert(2, prompts[4], budgets[4], 0.0, 0, 1.0, 0)
  late = {2: []}
  for _ in range(8):
    tokens = eng.generate().tokens
    late[2] += [t for t in tokens[2] if t >= 0]
  decoder = decode.Decoder(model, loaded.params, stop_tokens=[tok.eot_id])
  greedy = decode.Sampling(temperature=0)
  for slot, (prompt, n) in enumerate(zip(prompts[:4], budgets[:4])):
    (offline,), _ = decode.complete(decoder, [prompt], n, greedy)
    assert got[slot] == offline, (slot, got[slot], offline)
  (offline,), _ = decode.complete(decoder, [prompts[4]], budgets[4], greedy)
  assert late[2] == offline
  assert eng.compiles() == compiled  # prompts of 1..21 tokens: only the warmed-up buckets


def test_a_sampled_row_does_not_depend_on_its_batch(loaded):
  tok = loaded.tokenizer
  eng = engine.Engine(
    loaded.model, loaded.params, slots=4, stop_tokens=[], chunk=4, smallest_span=8
  )
  p = lambda text: tok.encode(text).tolist()
  mixed = _serve(
    eng,
    {
      0: [(0, p("ROMEO:"), 20, 0.8, 10, 0.9, 7), (1, p("O"), 20, 0.0, 0, 1.0, 0)],
      1: [(2, p("JULIET:"), 16, 1.3, 0, 0.8, 3), (3, p("KING"), 20, 0.5, 5, 1.0, 11)],
    },
    rounds=8,
  )
  for slot, request in [
    (0, (p("ROMEO:"), 20, 0.8, 10, 0.9, 7)),
    (2, (p("JULIET:"), 16, 1.3, 0, 0.8, 3)),
  ]:
    alone = _serve(eng, {0: [(3 - slot, *request)]}, rounds=8)  # another slot, alone
    assert alone[3 - slot] == mixed[slot]
  assert len(mixed[2]) == 16 and len(set(map(tuple, mixed.values()))) == 4
  other_seed = _serve(eng, {0: [(0, p("ROMEO:"), 20, 0.8, 10, 0.9, 8)]}, rounds=8)
  assert other_seed[0] != mixed[0]


@pytest.mark.parametrize("weights, kv", [("none", "none"), ("int8", "int8")])  # int8: both paths
def test_each_rows_logits_equal_a_full_forward_pass(weights, kv):
  """Rows entering at different times, sampled so their tokens differ, in a 48-token context
  held in segments of 8, 8, 16 and 16 slots: after every chunk each row's next-token logits
  are those of the whole model run on its tokens so far (a slot misplaced in the cache, or a
  segment left out of attention, moves them by far more than the tolerance). With an int8
  cache, the whole run goes through the model's int8 cache as well; with int8 weights, both
  through the int8 CPU kernel."""
  config = tiny_config(model__block_size=48, model__vocab_size=40, model__init_std=0.3)
  quant = quantize.Quant(weights, kv)
  loaded = inference.quantized(serve_bench.random_weights(config), quant)
  eng = engine.Engine(loaded.model, loaded.params, slots=3, chunk=5, smallest_span=8)
  assert eng.segments == (8, 8, 16, 16)

  @jax.jit
  def forward(tokens_1xT):
    start = jnp.zeros((1,), jnp.int32)
    init = functools.partial(loaded.model.init, start_B=start)
    shapes = jax.eval_shape(init, jax.random.PRNGKey(0), tokens_1xT)["cache"]
    cache = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
    variables = {"params": loaded.params, "cache": cache}
    positions = jnp.arange(tokens_1xT.shape[1])[None]
    return loaded.model.apply(variables, tokens_1xT, positions, start_B=start, mutable=["cache"])[0]

  rng = np.random.default_rng(0)
  arrivals = {0: [(0, 3, 40)], 1: [(1, 12, 30)], 3: [(2, 17, 25)]}  # slot, prompt, budget
  rows = {}
  for r in range(9):
    for slot, length, budget in arrivals.get(r, ()):
      rows[slot] = rng.integers(0, 40, length).tolist()
      eng.insert(slot, rows[slot], budget, 1.0, 0, 1.0, seed=slot)
    tokens = eng.generate().tokens
    logits = np.asarray(eng.state.logits_BxV)
    for slot in rows:
      rows[slot] += [int(t) for t in tokens[slot] if t >= 0]
      padded = np.zeros((1, 48), np.int32)  # one compile; causal: the pads change nothing
      padded[0, : len(rows[slot])] = rows[slot]
      want = np.asarray(forward(padded))[0, len(rows[slot]) - 1]
      np.testing.assert_allclose(logits[slot, :40], want[:40], atol=2e-4, rtol=2e-4)
  assert sorted(len(t) for t in rows.values()) == [42, 42, 43]  # past every segment boundary


@pytest.mark.parametrize("kv", ["none", "int8"])
def test_a_generate_step_writes_each_cache_segment_in_place(kv):
  """Inside the engine's token loop no cache segment is copied or transposed: each step
  reads the segments, then scatters its rows' entries into them in place."""
  config = tiny_config(model__block_size=48, model__vocab_size=40)
  loaded = inference.quantized(serve_bench.random_weights(config), quantize.Quant(kv=kv))
  eng = engine.Engine(loaded.model, loaded.params, slots=3, chunk=4, smallest_span=16)
  span = eng.spans[-1]
  part = eng._part(span)[1]
  hlo = eng._generate.lower(eng.params, part, eng.widths[-1]).compile().as_text()
  segments = part.cache["h_0"]["attn"]["cached_key"]
  assert len(segments) > 1
  copies = [c for seg in segments for c in cache_copies_in_loops(hlo, seg.shape)]
  assert not copies, "\n".join(copies)

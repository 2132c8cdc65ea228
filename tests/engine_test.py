"""The serving engine: continuous batching gives the offline decoder's greedy tokens, a
sampled row does not depend on its batch, and nothing compiles after warm-up."""

import pytest

from gptjax import decode, engine, inference


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
  eng = engine.Engine(model, loaded.params, slots=4, stop_tokens=[tok.eot_id], chunk=3)
  eng.warm_up()
  compiled = eng.compiles()
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
  eng = engine.Engine(loaded.model, loaded.params, slots=4, stop_tokens=[], chunk=4)
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

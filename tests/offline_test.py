"""Offline generation on the engine: each reply is what it would be alone, at any slot count,
past the context's end too, and stop strings cut it."""

import pytest

from gptjax import decode, engine, inference, offline
from gptjax.errors import UserError

# Slow tier: compiles an engine's programs and a decoder's (a few seconds each).
pytestmark = pytest.mark.slow

TEXTS = ["ROMEO:", "First Citizen:\nBefore we proceed any further, hear me", "O", "KING"]


@pytest.fixture(scope="module")
def loaded(trained_tiny):
  return inference.load(str(trained_tiny))


@pytest.fixture(scope="module")
def engines(loaded):
  """engines(slots): one engine per slot count, shared (each compiles its programs once)."""
  made = {}

  def get(slots):
    if slots not in made:
      eot = loaded.tokenizer.eot_id
      made[slots] = engine.Engine(loaded.model, loaded.params, slots, [eot], chunk=5)
    return made[slots]

  return get


def test_greedy_replies_are_the_decoders_for_each_prompt_alone(loaded, engines):
  tok = loaded.tokenizer
  prompts = [tok.encode(t).tolist() for t in TEXTS]
  max_new = 45  # past the 32-token context: every row slides at least once
  greedy = decode.Sampling(temperature=0.0)
  texts, reasons = offline.complete(engines(3), tok, prompts, max_new, greedy)
  decoder = decode.Decoder(loaded.model, loaded.params, [tok.eot_id])
  for i in (0, 1):  # a short prompt, and one longer than the context
    (alone,), (why,) = decode.complete(decoder, [prompts[i]], max_new, greedy)
    assert (texts[i], reasons[i]) == (tok.decode(alone), why)
  assert reasons.count("length") >= 1 and max(len(tok.encode(t)) for t in texts) == max_new


def test_sampled_replies_do_not_depend_on_the_slot_count(loaded, engines):
  tok = loaded.tokenizer
  prompts = [tok.encode(t).tolist() for t in TEXTS * 2]
  hot = decode.Sampling(temperature=1.0, top_k=20)
  one = offline.complete(engines(1), tok, prompts, 40, hot, seed=7)
  three = offline.complete(engines(3), tok, prompts, 40, hot, seed=7)
  assert one == three
  assert len(set(one[0])) > 4  # the seed is per prompt: repeated prompts sample apart
  assert offline.complete(engines(3), tok, prompts, 40, hot, seed=8) != one
  assert offline.complete(engines(3), tok, prompts[:1], 5, hot, seed=-1)  # as sample takes it
  with pytest.raises(UserError, match="every prompt needs at least one token"):
    offline.complete(engines(3), tok, [prompts[0], []], 5, hot)


def test_a_stop_string_cuts_the_reply_even_across_a_slide(loaded, engines):
  tok = loaded.tokenizer  # characters: a token is a character
  prompts = [tok.encode(t).tolist() for t in TEXTS]
  greedy = decode.Sampling(temperature=0.0)
  full, ends = offline.complete(engines(3), tok, prompts, 45, greedy)
  # each stop string straddles its reply's first slide: begun in one prefill, ended in the next
  first_round = [32 - len(p) for p in prompts]
  stops = tuple(sorted({t[n - 1 : n + 2] for t, n in zip(full, first_round) if n > 1}))
  cut, reasons = offline.complete(engines(3), tok, prompts, 45, greedy, stop=stops)
  for whole, end, text, reason in zip(full, ends, cut, reasons):
    hits = [whole.find(s) for s in stops if s in whole]
    assert (text, reason) == ((whole[: min(hits)], "stop_sequence") if hits else (whole, end))
  assert reasons.count("stop_sequence") >= 3
  assert offline.complete(engines(3), tok, prompts, 45, greedy, stop=("", *stops)) == (cut, reasons)

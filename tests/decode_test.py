"""Decoding: the cache matches full recomputation; samplers respect their filters; stops;
the cache is updated in place."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import cache_copies_in_loops, tiny_config

from gptjax import decode
from gptjax.errors import UserError
from gptjax.model import GPT, GPTConfig

VOCAB = 50


def _model(positions="learned"):
  model = GPT(GPTConfig.from_config(tiny_config(model__positions=positions).model, VOCAB))
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32), jnp.int32))["params"]
  params = jax.tree.map(
    lambda x: x * 20 if x.ndim > 1 else x,  # sharper, less tied logits
    jax.tree.map(lambda x: x.value, params, is_leaf=lambda x: hasattr(x, "value")),
  )
  return model, params


PROMPTS = [[5, 9, 2], [7, 1, 4, 4, 8, 30, 11], [3, 3, 12, 40, 1]]  # ragged


def _greedy_by_recomputation(model, params, prompts, n):
  """No cache: the whole sequence again for every token (right-padded to one shape, one
  compile: the model is causal, so padding after position i never changes logits at i)."""
  apply = jax.jit(lambda t: model.apply({"params": params}, t))
  out = []
  for prompt in prompts:
    seq = list(prompt)
    for _ in range(n):
      padded = np.zeros((1, model.cfg.block_size), np.int32)
      padded[0, : len(seq)] = seq
      seq.append(int(jnp.argmax(apply(padded)[0, len(seq) - 1, :VOCAB])))
    out.append(seq[len(prompt) :])
  return out


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_cached_greedy_equals_full_recomputation_for_ragged_prompts(positions):
  model, params = _model(positions)
  tokens, start = decode.left_pad(PROMPTS)
  d = decode.Decoder(model, params)
  state, out, count = d.generate(d.prefill(tokens, start, 12), 12, decode.Sampling(0.0))
  assert list(np.asarray(count)) == [12, 12, 12]
  assert np.asarray(out).tolist() == _greedy_by_recomputation(model, params, PROMPTS, 12)
  assert decode.finish_reasons(state) == ["length"] * 3  # the cache (P + 12 slots) is full


@pytest.mark.slow
def test_generating_in_chunks_equals_one_call():
  model, params = _model()
  tokens, start = decode.left_pad(PROMPTS)
  d = decode.Decoder(model, params)
  _, whole, _ = d.generate(d.prefill(tokens, start, 12), 12, decode.Sampling(0.0))
  state, parts = d.prefill(tokens, start, 12), []
  for _ in range(3):
    state, out, _ = d.generate(state, 4, decode.Sampling(0.0))
    parts.append(np.asarray(out))
  np.testing.assert_array_equal(np.concatenate(parts, axis=1), whole)


@pytest.mark.slow
def test_stop_tokens_and_sequences_end_rows_independently():
  model, params = _model()
  tokens, start = decode.left_pad(PROMPTS)
  free = decode.Decoder(model, params)
  _, greedy, _ = free.generate(free.prefill(tokens, start, 12), 12, decode.Sampling(0.0))
  greedy = np.asarray(greedy)
  stop = int(greedy[0, 3])
  d = decode.Decoder(model, params, stop_tokens=[stop])
  state, out, count = d.generate(d.prefill(tokens, start, 12), 12, decode.Sampling(0.0))
  reasons = decode.finish_reasons(state)
  for b in range(3):
    hits = np.flatnonzero(greedy[b] == stop)
    expect = hits[0] + 1 if hits.size else 12
    assert count[b] == expect  # the stop token is emitted, then the row ends
    np.testing.assert_array_equal(out[b, :expect], greedy[b, :expect])
    assert (out[b, expect:] == -1).all()
    assert reasons[b] == ("stop_token" if hits.size else "length")
  seq = [int(t) for t in greedy[1, 2:4]]
  d = decode.Decoder(model, params, stop_sequences=[seq])
  state, _, count = d.generate(d.prefill(tokens, start, 12), 12, decode.Sampling(0.0))
  assert count[1] <= 4 and decode.finish_reasons(state)[1] == "stop_sequence"


def _greedy_sliding_window(model, params, prompt, n):
  """nanoGPT's generation past the context by hand: the model sees at most block_size - 1
  prompt tokens, then its window grows token by token; when it holds block_size tokens it
  restarts from their last half. Each token is the argmax of a full forward of its window."""
  block = model.cfg.block_size
  apply = jax.jit(lambda t: model.apply({"params": params}, t))
  text, out = list(prompt), []
  start = len(text) - min(len(text), block - 1)
  while len(out) < n:
    if len(text) - start == block:
      start = len(text) - block // 2
    window = np.zeros((1, block), np.int32)  # right-padded: causal, so harmless
    window[0, : len(text) - start] = text[start:]
    token = int(jnp.argmax(apply(window)[0, len(text) - start - 1, :VOCAB]))
    text.append(token)
    out.append(token)
  return out


@pytest.mark.slow
@pytest.mark.parametrize("prompt_len", [5, 45])  # within the 32-token context, and beyond it
def test_complete_past_the_context_equals_greedy_sliding_by_hand(prompt_len):
  model, params = _model()
  prompt = np.random.default_rng(prompt_len).integers(0, VOCAB, prompt_len).tolist()
  max_new = 60  # several slides of the window whatever the prompt
  streamed = []
  (got,), reasons = decode.complete(
    decode.Decoder(model, params),
    [prompt],
    max_new,
    decode.Sampling(0.0),
    on_tokens=streamed.append,
  )
  assert reasons == ["length"] and len(streamed) >= 3  # it really slid, more than once
  assert [t for s in streamed for t in s[0]] == got
  assert got == _greedy_sliding_window(model, params, prompt, max_new)


LOGITS = jnp.log(jnp.array([[0.05, 0.5, 0.02, 0.3, 0.13]]))  # order: 1, 3, 4, 0, 2


def _draws(sampling, n=4000, seed=0):
  logits = jnp.repeat(LOGITS, n, axis=0)
  return set(np.asarray(decode.sample(logits, jax.random.PRNGKey(seed), sampling)).tolist())


def test_top_k_never_leaves_the_k_most_likely():
  assert _draws(decode.Sampling(1.0, top_k=2)) == {1, 3}
  assert _draws(decode.Sampling(3.0, top_k=3)) == {1, 3, 4}  # even when flattened
  assert _draws(decode.Sampling(1.0, top_k=200)) == {0, 1, 2, 3, 4}  # k > vocab: all


def test_top_p_never_leaves_the_nucleus():
  assert _draws(decode.Sampling(1.0, top_p=0.7)) == {1, 3}  # 0.5 + 0.3 reaches 0.7
  assert _draws(decode.Sampling(1.0, top_p=0.5)) == {1}
  assert _draws(decode.Sampling(1.0, top_p=0.9)) == {1, 3, 4}
  assert _draws(decode.Sampling(1.0, top_k=2, top_p=0.9)) == {1, 3}  # combined
  assert _draws(decode.Sampling(1.0)) == {0, 1, 2, 3, 4}


@pytest.mark.slow
def test_temperature_towards_zero_is_greedy_and_seeds_reproduce():
  model, params = _model()
  tokens, start = decode.left_pad(PROMPTS)
  d = decode.Decoder(model, params)
  run = lambda s, seed=0: np.asarray(d.generate(d.prefill(tokens, start, 10, seed), 10, s)[1])
  np.testing.assert_array_equal(run(decode.Sampling(1e-4)), run(decode.Sampling(0.0)))
  hot = decode.Sampling(2.0, top_k=20, top_p=0.95)
  np.testing.assert_array_equal(run(hot, seed=7), run(hot, seed=7))
  assert not np.array_equal(run(hot, seed=7), run(hot, seed=8))


def test_errors_name_the_problem():
  model, params = _model()
  d = decode.Decoder(model, params)
  tokens, start = decode.left_pad([[1] * 30])
  with pytest.raises(UserError, match="exceeds the context of 32 tokens"):
    d.prefill(tokens, start, 5)
  with pytest.raises(UserError, match=r"top_p=1.5 must be in \(0, 1\]"):
    decode.Sampling(1.0, top_p=1.5).check(VOCAB)
  with pytest.raises(UserError, match="at least one token"):
    decode.left_pad([[1], []])


@pytest.mark.slow
def test_decoding_with_params_sharded_over_a_mesh_matches_one_device():
  from gptjax import sharding

  config = tiny_config(mesh__shape__data=1, mesh__shape__fsdp=4, mesh__shape__tensor=2)
  mesh, rules = sharding.make_mesh(config.mesh), sharding.rules(config.mesh)
  model, params = _model()
  boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32), jnp.int32))
  shardings = sharding.tree_shardings(boxed["params"], mesh, rules)
  sharded = jax.device_put(params, shardings)
  assert tuple(sharded["wte"]["embedding"].sharding.spec) == ("tensor", "fsdp")  # really split
  prompts = PROMPTS + [[2, 2, 9, 1]]  # 4 rows: the batch splits over fsdp
  tokens, start = decode.left_pad(prompts)
  hot = decode.Sampling(1.5, top_k=20, top_p=0.95)
  results = []
  for p, m in ((params, None), (sharded, mesh)):
    d = decode.Decoder(model, p, mesh=m, rules=rules)
    for s in (decode.Sampling(0.0), hot):
      state, out, _ = d.generate(d.prefill(tokens, start, 12, seed=3), 12, s)
      results.append(np.asarray(out))
  key = state.cache["h_0"]["attn"]["cached_key"]
  assert "tensor" in str(key.sharding.spec)  # the cache splits its heads over tensor
  np.testing.assert_array_equal(results[0], results[2])  # greedy
  np.testing.assert_array_equal(results[1], results[3])  # sampled, same seed


@pytest.mark.slow
def test_bf16_decoding_picks_the_argmax_of_a_bf16_full_forward():
  """bf16 rounding differs between the cached and the full computation, so tokens may flip on
  near-ties; each cached greedy choice must be (within bf16 error) the full pass's argmax."""
  cfg = GPTConfig.from_config(tiny_config(model__dtype="bfloat16").model, VOCAB)
  model = GPT(cfg)
  _, params = _model()
  tokens, start = decode.left_pad(PROMPTS)
  d = decode.Decoder(model, params)
  state, out, _ = d.generate(d.prefill(tokens, start, 12), 12, decode.Sampling(0.0))
  assert state.cache["h_0"]["attn"]["cached_key"].dtype == jnp.bfloat16
  for b, prompt in enumerate(PROMPTS):
    seq = np.zeros((1, 32), np.int32)
    seq[0, : len(prompt) + 12] = prompt + list(np.asarray(out[b]))
    logits = np.asarray(model.apply({"params": params}, seq)[0, :, :VOCAB], np.float32)
    for i in range(12):
      step = logits[len(prompt) - 1 + i]
      chosen = step[int(out[b, i])]
      assert chosen >= step.max() - 0.02 * np.abs(step).max(), (b, i)


@pytest.mark.slow
def test_scan_layers_decodes_as_the_loop():
  """Stacked KV caches ((L, B, N, S, H), scan_layers) give the per-layer caches' tokens."""
  import dataclasses

  from gptjax.model import to_layout

  model, params = _model()
  scan = GPT(dataclasses.replace(model.cfg, scan_layers=True))
  tokens, start = decode.left_pad(PROMPTS)
  outs = []
  for m, p in ((model, params), (scan, to_layout(params, scan.cfg))):
    d = decode.Decoder(m, p)
    state = d.prefill(tokens, start, 12)
    for _ in range(2):  # twice: the stacked index must carry over between calls
      state, out, _ = d.generate(state, 6, decode.Sampling(0.0))
      outs.append(np.asarray(out))
  np.testing.assert_array_equal(np.concatenate(outs[:2], 1), np.concatenate(outs[2:], 1))


def test_a_stop_sequence_split_between_two_prefills_is_found():
  # complete() re-prefills when the cache is full; the jitted loop then sees only its own
  # round's tokens, so "\n\n" as its last and the next round's first token is found here.
  assert decode._stop_across([5, 6, 0, 0, 7], before=3, stop_sequences=[(0, 0)]) == 4
  assert decode._stop_across([5, 0, 0, 7], before=3, stop_sequences=[(0, 0)]) is None  # seen
  assert decode._stop_across([5, 6, 0, 7], before=3, stop_sequences=[(0, 0)]) is None


@pytest.mark.parametrize("kv_quant", ["none", "int8"])
def test_a_decoding_step_updates_the_cache_in_place(kv_quant):
  """No step copies or transposes a cache: inside the token loop the only ops on a whole
  cache are its reads and one in-place write per cache (XLA's CPU backend copied each cache
  twice a step while attention read the cache after writing it, BUILD_NOTES "Decoding")."""
  model, params = _model()
  model = GPT(dataclasses.replace(model.cfg, kv_quant=kv_quant))
  d = decode.Decoder(model, params)
  tokens, start = decode.left_pad(PROMPTS)
  state = d.prefill(tokens, start, 8)
  hlo = d._generate.lower(d.params, state, 8, decode.Sampling(0.0)).compile().as_text()
  shape = state.cache["h_0"]["attn"]["cached_key"].shape
  copies = cache_copies_in_loops(hlo, shape)
  assert not copies, "\n".join(copies)


def test_int8_kv_decoding_steps_equal_one_int8_prefill():
  """A decoding step's int8 KV path (each token quantized, attended as a separate segment,
  then written) gives the logits that writing all those tokens at once gives: the last
  position's logits of a prefill over the prompt and the generated tokens."""
  model, params = _model()
  model = GPT(dataclasses.replace(model.cfg, kv_quant="int8"))
  d = decode.Decoder(model, params)
  tokens, start = decode.left_pad(PROMPTS)
  state, out, _ = d.generate(d.prefill(tokens, start, 6), 6, decode.Sampling(0.0))
  whole = np.concatenate([tokens, np.asarray(out)], axis=1)  # prompts, then the 6 new tokens
  again = d.prefill(whole[:, :-1], start, 1)  # everything but the last, written at once
  stepped = d.generate(d.prefill(tokens, start, 6), 5, decode.Sampling(0.0))[0]
  np.testing.assert_allclose(stepped.logits_BxV, again.logits_BxV, rtol=1e-4, atol=1e-4)

"""Jit-compiled decoding: a static-shape KV cache, prefill, and a lax.while_loop token loop.

A batch of prompts of different lengths is left-padded to one length P, so every row writes
the same cache slot at each step (one shared index) and row b's tokens sit at slots
start_B[b]..index; positions count from each row's first real token. `prefill` runs the
prompts through the model in one call and fills slots 0..P-1; `generate` samples n tokens
inside one `lax.while_loop` (no Python per token) and can be called again to continue, which
is how chat streams text a few tokens per call. Rows stop independently at a stop token, a
stop sequence, or the token budget.
"""

import contextlib
import dataclasses
import functools
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from gptjax import sharding
from gptjax.errors import UserError
from gptjax.model import GPT

FINISH = {0: "length", 1: "stop_token", 2: "stop_sequence"}  # finish_B codes; -1: running


@dataclasses.dataclass(frozen=True)
class Sampling:
  """temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""

  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0

  def check(self, vocab_size: int) -> None:
    if not (math.isfinite(self.temperature) and self.temperature >= 0):  # NaN fails `< 0`
      raise UserError(
        f"--temperature={self.temperature} must be a finite number >= 0 (0 is greedy)"
      )
    if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
      raise UserError(f"--top_p={self.top_p} must be in (0, 1]")
    if self.top_k < 0:
      raise UserError(
        f"top_k={self.top_k} must be >= 0 (0: off; above the vocabulary size "
        f"{vocab_size} it keeps every token)"
      )


def sample(logits_BxV, rng, sampling: Sampling):
  """Next tokens (B,) from logits: greedy, or temperature + top-k + top-p, combinable."""
  logits_BxV = logits_BxV.astype(jnp.float32)
  if sampling.temperature == 0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = logits_BxV / sampling.temperature
  neg = jnp.finfo(jnp.float32).min
  if (
    sampling.top_k and sampling.top_k < logits_BxV.shape[-1]
  ):  # a larger k keeps everything (nanoGPT's)
    kth_Bx1 = jax.lax.top_k(logits_BxV, sampling.top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_Bx1, neg, logits_BxV)
  if sampling.top_p < 1:
    # The nucleus: the most likely tokens until their mass reaches top_p (at least one).
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    keep_BxV = mass_before_BxV < sampling.top_p
    cutoff_Bx1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    logits_BxV = jnp.where(logits_BxV < cutoff_Bx1, neg, logits_BxV)
  return jax.random.categorical(rng, logits_BxV, axis=-1).astype(jnp.int32)


@flax.struct.dataclass
class DecodeState:
  cache: Any  # the model's "cache" collection: (B, N, S, H) keys and values per layer
  logits_BxV: jax.Array  # the next token's logits
  start_B: jax.Array  # first real slot of each row
  done_B: jax.Array  # bool
  finish_B: jax.Array  # int32: -1 running, else a FINISH code
  recent_BxL: jax.Array  # the last L tokens of each row (for stop sequences)
  rng: jax.Array


def left_pad(prompts: list[list[int]], pad_id: int = 0):
  """Token lists -> (tokens (B, P) int32 left-padded, start_B int32)."""
  if not prompts or not all(len(p) for p in prompts):
    raise UserError("every prompt needs at least one token")
  p = max(len(x) for x in prompts)
  tokens = np.full((len(prompts), p), pad_id, np.int32)
  for b, x in enumerate(prompts):
    tokens[b, p - len(x) :] = x
  return tokens, np.array([p - len(x) for x in prompts], np.int32)


class Decoder:
  """Jitted prefill and generate for one model and its params.

  With a mesh (and the rules table), params may be sharded over it (e.g. restored onto the
  training shardings): the model's logical constraints then split activations and the cache
  the same way, and XLA inserts the collectives.
  """

  def __init__(self, model: GPT, params, stop_tokens=(), stop_sequences=(), mesh=None, rules=()):
    self.model, self.params = model, params
    self.mesh, self.rules = mesh, tuple(rules)
    self.stop_tokens = tuple(int(t) for t in stop_tokens)
    self.stop_sequences = tuple(tuple(int(t) for t in s) for s in stop_sequences if len(s))
    self._prefill = jax.jit(self._prefill_fn, static_argnums=(3,))
    self._generate = jax.jit(self._generate_fn, static_argnums=(2, 3), donate_argnums=(1,))

  def prefill(self, tokens_BxP, start_B, max_new: int, seed: int = 0) -> DecodeState:
    """Runs the prompts through the model (one call); the cache holds P + max_new slots."""
    total = tokens_BxP.shape[1] + max_new
    if total > self.model.cfg.block_size:
      raise UserError(
        f"prompt ({tokens_BxP.shape[1]} tokens) + max_new_tokens ({max_new}) = "
        f"{total} exceeds the context of {self.model.cfg.block_size} tokens; "
        "shorten the prompt or lower --max_new_tokens"
      )
    with self._context():
      return self._prefill(
        self.params, jnp.asarray(tokens_BxP), jnp.asarray(start_B), total, jax.random.PRNGKey(seed)
      )

  def generate(self, state: DecodeState, n: int, sampling: Sampling = Sampling()):
    """n more tokens per row -> (state, tokens (B, n) int32, counts (B,)): the rows' new
    tokens are tokens[b, :counts[b]] (a row that finished stops counting)."""
    with self._context():
      return self._generate(self.params, state, n, sampling)

  def _context(self):
    if self.mesh is None:
      return contextlib.nullcontext()
    return sharding.context(self.mesh, self.rules)

  def _prefill_fn(self, params, tokens_BxP, start_B, total: int, rng):
    b, p = tokens_BxP.shape
    shapes = jax.eval_shape(
      functools.partial(self.model.init, start_B=start_B),
      jax.random.PRNGKey(0),
      jnp.zeros((b, total), jnp.int32),
    )["cache"]
    cache = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
    positions_BxP = jnp.maximum(jnp.arange(p)[None, :] - start_B[:, None], 0)
    logits_BxPxV, mutated = self.model.apply(
      {"params": params, "cache": cache},
      tokens_BxP,
      positions_BxP,
      start_B=start_B,
      mutable=["cache"],
    )
    width = max([len(s) for s in self.stop_sequences], default=1)
    return DecodeState(
      cache=mutated["cache"],
      logits_BxV=logits_BxPxV[:, -1],
      start_B=start_B,
      done_B=jnp.zeros((b,), bool),
      finish_B=jnp.full((b,), -1, jnp.int32),
      recent_BxL=jnp.full((b, width), -1, jnp.int32),
      rng=rng,
    )

  def _generate_fn(self, params, state: DecodeState, n: int, sampling: Sampling):
    b = state.start_B.shape[0]

    def cond(carry):
      t, st, _, _ = carry
      return (t < n) & ~jnp.all(st.done_B)

    def body(carry):
      t, st, out_BxN, count_B = carry
      rng, key = jax.random.split(st.rng)
      token_B = sample(st.logits_BxV, key, sampling)
      live_B = ~st.done_B
      out_BxN = out_BxN.at[:, t].set(jnp.where(live_B, token_B, -1))
      count_B = count_B + live_B
      recent_BxL = jnp.concatenate([st.recent_BxL[:, 1:], token_B[:, None]], axis=1)
      finish_B = st.finish_B
      if self.stop_tokens:
        hit_B = jnp.isin(token_B, jnp.array(self.stop_tokens))
        finish_B = jnp.where(live_B & hit_B & (finish_B < 0), 1, finish_B)
      for seq in self.stop_sequences:
        tail_BxL = recent_BxL[:, recent_BxL.shape[1] - len(seq) :]
        hit_B = jnp.all(tail_BxL == jnp.array(seq)[None, :], axis=1)
        finish_B = jnp.where(live_B & hit_B & (finish_B < 0), 2, finish_B)
      index = _cache_index(st.cache)
      positions_Bx1 = (index - st.start_B)[:, None]
      logits_Bx1xV, mutated = self.model.apply(
        {"params": params, "cache": st.cache},
        token_B[:, None],
        positions_Bx1,
        start_B=st.start_B,
        mutable=["cache"],
      )
      full = index + 1 >= _cache_slots(st.cache)
      finish_B = jnp.where(live_B & (finish_B < 0) & full, 0, finish_B)
      st = st.replace(
        cache=mutated["cache"],
        logits_BxV=logits_Bx1xV[:, 0],
        done_B=finish_B >= 0,
        finish_B=finish_B,
        recent_BxL=recent_BxL,
        rng=rng,
      )
      return t + 1, st, out_BxN, count_B

    out_BxN = jnp.full((b, n), -1, jnp.int32)
    _, state, out_BxN, count_B = jax.lax.while_loop(
      cond, body, (jnp.int32(0), state, out_BxN, jnp.zeros((b,), jnp.int32))
    )
    return state, out_BxN, count_B


def _cache_leaves(cache, name):
  return [
    x for p, x in jax.tree_util.tree_leaves_with_path(cache) if getattr(p[-1], "key", None) == name
  ]


def _cache_index(cache):
  # Every layer's index moves together (scan_layers stacks them: (L,)).
  return jnp.ravel(_cache_leaves(cache, "cache_index")[0])[0]


def _cache_slots(cache):
  return _cache_leaves(cache, "cached_key")[0].shape[-2]  # ([L,] B, N, S, H)


def finish_reasons(state: DecodeState) -> list[str]:
  """Each row's finish reason: length, stop_token, stop_sequence, or running."""
  return [FINISH.get(int(c), "running") for c in np.asarray(state.finish_B)]


def complete(
  decoder: Decoder,
  prompts: list[list[int]],
  max_new: int,
  sampling: Sampling,
  seed: int = 0,
  on_tokens=None,
) -> tuple[list[list[int]], list[str]]:
  """Up to max_new tokens per prompt, past the context window if need be.

  When the cache is full, each row's text so far is cut to its last half-context and
  prefilled again (nanoGPT's sliding window, one prefill per half-context instead of one per
  token). on_tokens(new_tokens_per_row) is called after every jitted call (for streaming).
  """
  block = decoder.model.cfg.block_size
  keep = block // 2
  rows = [list(p)[-(block - 1) :] for p in prompts]  # a prompt keeps its last block-1 tokens
  produced = [[] for _ in prompts]
  reasons = ["length"] * len(prompts)
  live = list(range(len(prompts)))
  for round_ in range(max_new + 1):
    if not live:
      break
    context = [(rows[b] + produced[b])[-(block - 1 if round_ == 0 else keep) :] for b in live]
    tokens, start = left_pad(context)
    budget = min(block - tokens.shape[1], max_new - max(len(produced[b]) for b in live))
    if budget <= 0:
      break
    state = decoder.prefill(tokens, start, budget, seed + round_)
    state, out, count = decoder.generate(state, budget, sampling)
    out, count, finished = np.asarray(out), np.asarray(count), finish_reasons(state)
    new = {}
    for i, b in enumerate(live):
      new[b] = out[i, : count[i]].tolist()
      before = len(produced[b])
      produced[b] += new[b]
      if finished[i] in ("stop_token", "stop_sequence"):
        reasons[b] = finished[i]
      elif (end := _stop_across(produced[b], before, decoder.stop_sequences)) is not None:
        new[b] = new[b][: end - before]  # a stop sequence split by a new prefill
        produced[b], reasons[b] = produced[b][:end], "stop_sequence"
    if on_tokens:
      on_tokens(new)
    live = [b for b in live if reasons[b] == "length" and len(produced[b]) < max_new]
  return produced, reasons


def _stop_across(tokens: list[int], before: int, stop_sequences) -> int | None:
  """The end of the first stop sequence in `tokens` that ends after index `before` and
  started before it (the jitted loop sees only the tokens of its own round)."""
  for end in range(before + 1, len(tokens) + 1):
    for seq in stop_sequences:
      if (
        len(seq) > 1
        and end - len(seq) < before
        and tokens[max(0, end - len(seq)) : end] == list(seq)
      ):
        return end
  return None

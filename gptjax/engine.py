"""Continuous batching for serving: B decode slots over one model, each row at its own length.

A request is prefilled alone, its prompt right-padded to a bucket length (so the number of
compiled prefills is fixed: one per bucket), and inserted into a free slot of the running
batch; `generate` then advances every slot K tokens in one jitted `lax.while_loop`. The KV
cache is held in segments along its length (64, 64, 128, 256, ... slots): a call passes only
the segments its longest row reaches, so short requests in a long context neither read nor
copy the rest (a copied window of GPT-2 small's 32-row cache cost 11 ms a token on a CPU).
Between two generate calls finished rows leave and waiting requests enter (JetStream's prefill ->
insert -> generate), so no row waits for the longest one. Sampling settings are per-row
values (temperature, top-k, top-p, seed), never compile-time constants, and a row's random
numbers depend only on its seed and its token count: a request samples the same tokens
whatever else shares its batch.

`Engine` holds the device state and is driven by one thread (serve.py's); nothing here is
thread-safe by itself.
"""

import dataclasses
import functools
import os
from concurrent import futures
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from gptjax import slot_cache
from gptjax.errors import UserError
from gptjax.row_sampling import TOP, logprobs_rows, sample_rows


@flax.struct.dataclass
class Slots:
  cache: Any  # the model's cache collection: cached_key/value as a tuple of segments of
  # ([L,] B, N, S_i, H), the S_i summing to the context; cache_index ([L,] B): one per row
  logits_BxV: jax.Array  # each row's next-token logits
  done_B: jax.Array  # bool: free, or finished (the host then frees it)
  stopped_B: jax.Array  # bool: finished on a stop token (else on its budget)
  remaining_B: jax.Array  # int32 tokens the row may still generate
  made_B: jax.Array  # int32 tokens generated so far (with seed_B: the row's random stream)
  seed_B: jax.Array  # uint32
  temperature_B: jax.Array
  top_k_B: jax.Array  # int32, 0: off
  top_p_B: jax.Array  # 1: off
  logprobs_B: jax.Array  # int32: -1 none, else the token's and this many alternatives (<= TOP)


def buckets(block_size: int, smallest: int = 16) -> tuple[int, ...]:
  """Prefill lengths: powers of two from `smallest`, and the block size itself."""
  out, n = [], smallest
  while n < block_size:
    out.append(n)
    n *= 2
  return (*out, block_size)


class Engine:
  """B slots of one model; prefill/insert one request at a time, generate K tokens for all."""

  def __init__(
    self, model, params, slots: int, stop_tokens=(), chunk: int = 8, smallest_span: int = 64
  ):
    self.model, self.params, self.slots, self.chunk = model, params, slots, chunk
    self.block = model.cfg.block_size
    self.buckets = buckets(self.block)
    self.stop_tokens = tuple(int(t) for t in stop_tokens)
    self._insert = jax.jit(self._insert_fn, donate_argnums=(1,))
    # One generate program per width: the rows up to the highest one in use (slots are
    # filled lowest first), so one request alone runs a batch-1 step, not a B-row one.
    self.widths = tuple(w for w in buckets(slots, 1) if w <= slots)
    # ... and per span: the cache slots attention reads, up to the longest row in use plus a
    # chunk (a 1024-token context serving 128-token requests reads 128 slots, not 1024);
    # the cache's segments end at the spans.
    self.spans = buckets(self.block, min(smallest_span, self.block))
    self.segments = tuple(b - a for a, b in zip((0, *self.spans), self.spans))
    self.filled: dict[int, int] = {}  # slot in use -> its tokens in the cache (prompt + made)
    self._generate = jax.jit(self._generate_fn, static_argnums=(2,), donate_argnums=(1,))
    self._score = jax.jit(self._score_fn)
    free = lambda st, slot: st.replace(done_B=st.done_B.at[slot].set(True))
    self._free = jax.jit(free, donate_argnums=(0,))  # else each call copies every cache
    # committed to the device, as every later state is: else the first call compiles twice
    self.state = jax.device_put(jax.jit(self._empty)(), jax.local_devices()[0])

    # Compiled ahead of time, one executable per key: a call never traces or compiles
    # unless warm_up left its key out (counted by compiles()).
    self._programs: dict[tuple, Any] = {}

  def compiles(self) -> int:
    """Programs compiled so far: programs() after warm_up, and no more under load."""
    return len(self._programs)

  def programs(self) -> int:
    """The programs warm_up compiles: prefill and scoring per bucket, generate per width and
    span, and free."""
    return 2 * len(self.buckets) + len(self.widths) * len(self.spans) + 1

  def warm_up(self, threads: int | None = None) -> None:
    """Compiles every program without running one: lowered in turn (tracing holds the GIL),
    compiled side by side (XLA does not), each loaded from JAX's persistent compilation
    cache when one is on and holds it."""
    lowered = {("free",): self._free.lower(self.state, np.int32(0))}
    for length in self.buckets:
      tokens = np.zeros((1, length), np.int32)
      args = self._insert_args(0, length, 1, 0.0, 0, 1.0, 0, -1)
      lowered["insert", length] = self._insert.lower(self.params, self.state, tokens, *args)
      lowered["score", length] = self._score.lower(self.params, tokens)
    for width in self.widths:
      for span in self.spans:
        part = self._part(span)[1]
        lowered["generate", width, span] = self._generate.lower(self.params, part, width)
    with futures.ThreadPoolExecutor(threads or os.cpu_count()) as pool:
      done = pool.map(lambda item: (item[0], item[1].compile()), lowered.items())
      self._programs.update(done)

  def _call(self, key: tuple, jitted, *args, static=()):
    """The program for key (compiled now if warm_up did not), run on args."""
    if key not in self._programs:
      self._programs[key] = jitted.lower(*args, *static).compile()
    return self._programs[key](*args)

  def bucket(self, length: int) -> int:
    if not 0 < length <= self.block:
      raise UserError(f"a prompt of {length} tokens does not fit the {self.block}-token context")
    return next(b for b in self.buckets if b >= length)

  def insert(
    self, slot: int, prompt, max_new: int, temperature, top_k, top_p, seed, logprobs=-1
  ) -> None:
    """Prefills `prompt` into `slot` with a budget of max_new tokens (the context's end caps
    it: the caller checks prompt + max_new fits); logprobs: alternatives to report."""
    length = len(prompt)
    tokens = np.zeros((1, self.bucket(length)), np.int32)
    tokens[0, :length] = prompt
    args = self._insert_args(slot, length, max_new, temperature, top_k, top_p, seed, logprobs)
    key = ("insert", tokens.shape[1])
    self.state = self._call(key, self._insert, self.params, self.state, tokens, *args)
    self.filled[slot] = length

  def _insert_args(self, slot, length, max_new, temperature, top_k, top_p, seed, logprobs):
    return (
      np.int32(slot),
      np.int32(length),
      np.int32(max(0, min(max_new, self.block - length))),
      np.uint32(seed % 2**32),
      np.float32(temperature),
      np.int32(top_k),
      np.float32(top_p),
      np.int32(logprobs),
    )

  def free(self, slot: int) -> None:
    """Ends the row in `slot` (finished, or its client left): it generates no more."""
    self.state = self._call(("free",), self._free, self.state, np.int32(slot))
    self.filled.pop(slot, None)

  def generate(self) -> "Chunk":
    """Up to `chunk` tokens for every live row, as numpy (B rows; those past the width
    used are empty)."""
    top = max(self.filled, default=0) + 1
    width = next(w for w in self.widths if w >= top)
    longest = min(max(self.filled.values(), default=0) + self.chunk, self.block)
    span = next(s for s in self.spans if s >= longest)
    out = self._run_generate(width, span)
    b = self.slots
    pad = lambda x, fill: np.concatenate([x, np.full((b - width, *x.shape[1:]), fill, x.dtype)])
    tokens, logprobs, top_ids, top_lp = (np.asarray(x) for x in out)
    for slot in self.filled:
      self.filled[slot] += int(np.sum(tokens[slot] >= 0))
    return Chunk(
      pad(tokens, -1),
      pad(logprobs, 0),
      pad(top_ids, 0),
      pad(top_lp, 0),
      np.asarray(self.state.done_B),
      np.asarray(self.state.stopped_B),
    )

  def score(self, prompt) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Teacher-forced: each prompt token's logprob given the ones before it (the first gets
    none: nan), with the TOP likeliest alternatives' ids and logprobs, (P,), (P, TOP) x 2."""
    tokens = np.zeros((1, self.bucket(len(prompt))), np.int32)
    tokens[0, : len(prompt)] = prompt
    out = self._call(("score", tokens.shape[1]), self._score, self.params, tokens)
    chosen, top_ids, top_lp = (np.asarray(x)[: len(prompt)] for x in out)
    return chosen, top_ids, top_lp

  def _part(self, span: int) -> tuple[int, Slots]:
    """(m, the state with only the cache's first m segments: those up to span)."""
    m = self.spans.index(span) + 1
    return m, self.state.replace(cache=slot_cache.with_segments(self.state.cache, lambda x: x[:m]))

  def _run_generate(self, width: int, span: int):
    """generate over the cache's segments up to span; the others stay where they are."""
    whole, (m, part) = self.state, self._part(span)
    key = ("generate", width, span)  # part's buffers are donated
    part, out = self._call(key, self._generate, self.params, part, static=(width,))
    join = lambda new, old: new + old[m:] if slot_cache.is_segments(new) else new
    cache = jax.tree.map(join, part.cache, whole.cache, is_leaf=slot_cache.is_segments)
    self.state = part.replace(cache=cache)
    return out

  # --- jitted ---------------------------------------------------------------------------

  def _cache_shapes(self, batch: int, length: int):
    start_B = jnp.zeros((batch,), jnp.int32)
    init = functools.partial(self.model.init, start_B=start_B)
    return jax.eval_shape(init, jax.random.PRNGKey(0), jnp.zeros((batch, length), jnp.int32))[
      "cache"
    ]

  def _empty(self) -> Slots:
    b = self.slots

    def zeros(name, x):
      if name == "cache_index":  # ([L,]) -> ([L,] B): every row its own write slot
        return jnp.zeros((*x.shape, b), jnp.int32)
      s = slot_cache.length_axis(name, x.ndim)
      return tuple(jnp.zeros((*x.shape[:s], n, *x.shape[s + 1 :]), x.dtype) for n in self.segments)

    v = self.model.cfg.padded_vocab
    return Slots(
      cache=slot_cache.map_leaves(self._cache_shapes(b, self.block), zeros),
      logits_BxV=jnp.zeros((b, v), jnp.float32),
      done_B=jnp.ones((b,), bool),
      stopped_B=jnp.zeros((b,), bool),
      remaining_B=jnp.zeros((b,), jnp.int32),
      made_B=jnp.zeros((b,), jnp.int32),
      seed_B=jnp.zeros((b,), jnp.uint32),
      temperature_B=jnp.zeros((b,), jnp.float32),
      top_k_B=jnp.zeros((b,), jnp.int32),
      top_p_B=jnp.ones((b,), jnp.float32),
      logprobs_B=jnp.zeros((b,), jnp.int32),
    )

  def _score_fn(self, params, tokens_1xP):
    logits_PxV = self.model.apply({"params": params}, tokens_1xP, deterministic=True)[0]
    logprobs_PxV = jax.nn.log_softmax(logits_PxV.astype(jnp.float32), axis=-1)
    chosen_P = jnp.take_along_axis(logprobs_PxV[:-1], tokens_1xP[0, 1:, None], axis=-1)[:, 0]
    top_lp, top_ids = jax.lax.top_k(logprobs_PxV, TOP)
    pad = lambda x, v: jnp.concatenate([jnp.full((1, *x.shape[1:]), v, x.dtype), x[:-1]])
    return jnp.concatenate([jnp.array([jnp.nan]), chosen_P]), pad(top_ids, -1), pad(top_lp, jnp.nan)

  def _insert_fn(
    self, params, st: Slots, tokens_1xP, slot, length, budget, seed, temp, k, p, logprobs
  ):
    p_len = tokens_1xP.shape[1]
    fresh = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), self._cache_shapes(1, p_len))
    logits_1xPxV, mutated = self.model.apply(
      {"params": params, "cache": fresh},
      tokens_1xP,
      jnp.arange(p_len)[None, :],
      start_B=jnp.zeros((1,), jnp.int32),
      mutable=["cache"],
    )  # right padding: causal attention keeps the pads out of the real tokens' results

    def put(path, big, new):
      name = slot_cache.name_of(path)
      if name == "cache_index":
        return big.at[..., slot].set(length)
      s = slot_cache.length_axis(name, new.ndim)
      segments, start = [], 0
      for seg in big:  # the segments the prompt's bucket reaches get their part of it
        size = seg.shape[s]
        part = jax.lax.slice_in_dim(new, min(start, p_len), min(start + size, p_len), axis=s)
        at = [0] * seg.ndim
        at[s - 2] = slot  # ([L,] B, N, S_i[, H])
        if part.shape[s]:
          seg = jax.lax.dynamic_update_slice(seg, part.astype(seg.dtype), at)
        segments.append(seg)
        start += size
      return tuple(segments)

    cache = jax.tree_util.tree_map_with_path(
      put, st.cache, mutated["cache"], is_leaf=slot_cache.is_segments
    )
    logits_V = jax.lax.dynamic_index_in_dim(logits_1xPxV[0], length - 1, keepdims=False)
    at = lambda x, value: x.at[slot].set(value)
    return st.replace(
      cache=cache,
      logits_BxV=at(st.logits_BxV, logits_V.astype(jnp.float32)),
      done_B=at(st.done_B, budget <= 0),
      stopped_B=at(st.stopped_B, False),
      remaining_B=at(st.remaining_B, budget),
      made_B=at(st.made_B, 0),
      seed_B=at(st.seed_B, seed),
      temperature_B=at(st.temperature_B, temp),
      top_k_B=at(st.top_k_B, k),
      top_p_B=at(st.top_p_B, p),
      logprobs_B=at(st.logprobs_B, logprobs),
    )

  def _generate_fn(self, params, whole: Slots, width: int):
    """generate over rows [0, width) of the segments given, written back whole (a copy of
    those rows per call of K tokens; none when width is every row)."""
    window = lambda x, axis: jax.lax.slice_in_dim(x, 0, width, axis=axis)

    st, out = self._generate_rows(params, slot_cache.map_rows(whole, window))
    put = lambda part, axis, x: jax.lax.dynamic_update_slice(x, part, (0,) * x.ndim)
    return slot_cache.map_rows(whole, put, st), out

  def _generate_rows(self, params, st: Slots):
    b, k = st.done_B.shape[0], self.chunk

    def body(carry):
      t, st, out = carry
      token_B = sample_rows(
        st.logits_BxV, st.made_B, st.seed_B, st.temperature_B, st.top_k_B, st.top_p_B
      )
      live_B = ~st.done_B
      chosen_B, top_lp, top_ids = logprobs_rows(st.logits_BxV, token_B, live_B, st.logprobs_B)
      out = (
        out[0].at[:, t].set(jnp.where(live_B, token_B, -1)),
        out[1].at[:, t].set(chosen_B),
        out[2].at[:, t].set(top_ids),
        out[3].at[:, t].set(top_lp),
      )
      stop_B = live_B & jnp.isin(token_B, jnp.array(self.stop_tokens or (-1,)))
      remaining_B = st.remaining_B - live_B
      index_B = slot_cache.write_slots(st.cache, b)
      logits_Bx1xV, mutated = self.model.apply(
        {"params": params, "cache": st.cache},
        token_B[:, None],
        index_B[:, None],
        start_B=jnp.zeros((b,), jnp.int32),
        mutable=["cache"],
      )
      # Rows that were not live keep their write slot (their writes land past their end).
      cache = slot_cache.map_leaves(
        mutated["cache"], lambda n, x: jnp.where(live_B, x, x - 1) if n == "cache_index" else x
      )
      st = st.replace(
        cache=cache,
        logits_BxV=jnp.where(
          live_B[:, None], logits_Bx1xV[:, 0].astype(jnp.float32), st.logits_BxV
        ),
        done_B=st.done_B | stop_B | (remaining_B <= 0),
        stopped_B=st.stopped_B | stop_B,
        remaining_B=remaining_B,
        made_B=st.made_B + live_B,
      )
      return t + 1, st, out

    cond = lambda carry: (carry[0] < k) & ~jnp.all(carry[1].done_B)
    out = (
      jnp.full((b, k), -1, jnp.int32),
      jnp.zeros((b, k), jnp.float32),
      jnp.zeros((b, k, TOP), jnp.int32),
      jnp.zeros((b, k, TOP), jnp.float32),
    )
    _, st, out = jax.lax.while_loop(cond, body, (jnp.int32(0), st, out))
    return st, out


@dataclasses.dataclass
class Chunk:
  """One generate call's output: row b's new tokens are tokens[b][tokens[b] >= 0]."""

  tokens: np.ndarray  # (B, K) int32, -1 past a row's end
  logprobs: np.ndarray  # (B, K) the model's log-probability of each token
  top_ids: np.ndarray  # (B, K, TOP) the likeliest alternatives (rows that asked)
  top_logprobs: np.ndarray  # (B, K, TOP)
  done: np.ndarray  # (B,) bool
  stopped: np.ndarray  # (B,) bool: ended on a stop token

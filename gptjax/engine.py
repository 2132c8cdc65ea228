"""Continuous batching for serving: B decode slots over one model, each row at its own length.

A request is prefilled alone, its prompt right-padded to a bucket length (so the number of
compiled prefills is fixed: one per bucket), and inserted into a free slot of the running
batch; `generate` then advances every slot K tokens in one jitted `lax.while_loop`. Between
two generate calls finished rows leave and waiting requests enter (JetStream's prefill ->
insert -> generate), so no row waits for the longest one. Sampling settings are per-row
values (temperature, top-k, top-p, seed), never compile-time constants, and a row's random
numbers depend only on its seed and its token count: a request samples the same tokens
whatever else shares its batch.

`Engine` holds the device state and is driven by one thread (serve.py's); nothing here is
thread-safe by itself.
"""

import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from gptjax.errors import UserError


@flax.struct.dataclass
class Slots:
  cache: Any  # the model's cache collection, B rows of S slots, cache_index (B,) per layer
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


TOP = 5  # the most alternatives a token's logprobs report (OpenAI's limit for completions)


def buckets(block_size: int, smallest: int = 16) -> tuple[int, ...]:
  """Prefill lengths: powers of two from `smallest`, and the block size itself."""
  out, n = [], smallest
  while n < block_size:
    out.append(n)
    n *= 2
  return (*out, block_size)


def sample_rows(logits_BxV, made_B, seed_B, temperature_B, top_k_B, top_p_B):
  """decode.sample with per-row settings: greedy where temperature is 0, else temperature,
  top-k then top-p, as decode.sample orders them. Row b's key is fold_in(seed_b, made_b)."""
  logits_BxV = logits_BxV.astype(jnp.float32)
  greedy_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  neg = jnp.finfo(jnp.float32).min
  v = logits_BxV.shape[-1]

  def sampled():
    scaled_BxV = logits_BxV / jnp.where(temperature_B > 0, temperature_B, 1.0)[:, None]
    sorted_BxV = -jnp.sort(-scaled_BxV, axis=-1)
    k_B = jnp.where((top_k_B > 0) & (top_k_B < v), top_k_B, v)
    kth_Bx1 = jnp.take_along_axis(sorted_BxV, (k_B - 1)[:, None], axis=-1)
    scaled_BxV = jnp.where(scaled_BxV < kth_Bx1, neg, scaled_BxV)
    sorted_BxV = jnp.where(sorted_BxV < kth_Bx1, neg, sorted_BxV)
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    keep_BxV = mass_before_BxV < top_p_B[:, None]
    cutoff_Bx1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    cutoff_Bx1 = jnp.where(top_p_B[:, None] < 1, cutoff_Bx1, neg)
    scaled_BxV = jnp.where(scaled_BxV < cutoff_Bx1, neg, scaled_BxV)
    keys = jax.vmap(lambda s, m: jax.random.fold_in(jax.random.PRNGKey(s), m))(seed_B, made_B)
    return jax.vmap(jax.random.categorical)(keys, scaled_BxV).astype(jnp.int32)

  # The sort costs a full pass over the vocabulary: only when some row samples.
  drawn_B = jax.lax.cond(jnp.any(temperature_B > 0), sampled, lambda: greedy_B)
  return jnp.where(temperature_B > 0, drawn_B, greedy_B)


def _leaves(tree, fn):
  """Maps fn(name, leaf) over the cache's leaves (names: cached_key, cached_value, cache_index)."""
  return jax.tree_util.tree_map_with_path(lambda p, x: fn(p[-1].key, x), tree)


def _rows(st: Slots, fn, other: Slots | None = None) -> Slots:
  """Maps fn(x, batch axis) (or fn(other's x, axis, x)) over every per-row array of st."""

  def axis(path, x):
    name = getattr(path[-1], "key", getattr(path[-1], "name", None))
    if name == "cache_index":
      return x.ndim - 1  # ([L,] B)
    return x.ndim - 4 if name in ("cached_key", "cached_value") else 0  # ([L,] B, N, S, H)

  if other is None:
    return jax.tree_util.tree_map_with_path(lambda p, x: fn(x, axis(p, x)), st)
  return jax.tree_util.tree_map_with_path(lambda p, x, o: fn(o, axis(p, x), x), st, other)


def _logprobs(logits_BxV, token_B, live_B, want_B):
  """The model's log-probabilities (not the sampler's) of the chosen tokens, and the TOP
  likeliest alternatives; each pass over the vocabulary only when a live row asked."""
  b = token_B.shape[0]
  logprobs_BxV = lambda: jax.nn.log_softmax(logits_BxV, axis=-1)

  def chosen():
    return jnp.take_along_axis(logprobs_BxV(), token_B[:, None], axis=-1)[:, 0]

  def top():
    return tuple(jax.lax.top_k(logprobs_BxV(), TOP))

  chosen_B = jax.lax.cond(jnp.any(live_B & (want_B >= 0)), chosen, lambda: jnp.zeros((b,)))
  top_lp, top_ids = jax.lax.cond(
    jnp.any(live_B & (want_B > 0)),
    top,
    lambda: (jnp.zeros((b, TOP), jnp.float32), jnp.zeros((b, TOP), jnp.int32)),
  )
  return chosen_B, top_lp, top_ids


def _write_slots(cache, b: int):
  """Each row's next write slot (B,): every layer's index moves together."""
  index = next(
    x for p, x in jax.tree_util.tree_leaves_with_path(cache) if p[-1].key == "cache_index"
  )
  return jnp.reshape(index, (-1, b))[0]


class Engine:
  """B slots of one model; prefill/insert one request at a time, generate K tokens for all."""

  def __init__(self, model, params, slots: int, stop_tokens=(), chunk: int = 8):
    self.model, self.params, self.slots, self.chunk = model, params, slots, chunk
    self.block = model.cfg.block_size
    self.buckets = buckets(self.block)
    self.stop_tokens = tuple(int(t) for t in stop_tokens)
    self._insert = jax.jit(self._insert_fn, donate_argnums=(1,))
    # One generate program per width: the rows up to the highest one in use (slots are
    # filled lowest first), so one request alone runs a batch-1 step, not a B-row one.
    self.widths = tuple(w for w in buckets(slots, 1) if w <= slots)
    # ... and per span: the cache slots attention reads, up to the longest row in use plus a
    # chunk (a 1024-token context serving 128-token requests reads 128 slots, not 1024).
    self.spans = tuple(b for b in self.buckets if b >= min(64, self.block))
    self.filled: dict[int, int] = {}  # slot in use -> its tokens in the cache (prompt + made)
    self._generate = jax.jit(self._generate_fn, static_argnums=(2, 3), donate_argnums=(1,))
    self._score = jax.jit(self._score_fn)
    free = lambda st, slot: st.replace(done_B=st.done_B.at[slot].set(True))
    self._free = jax.jit(free, donate_argnums=(0,))  # else each call copies every cache
    # committed to the device, as every later state is: else the first call compiles twice
    self.state = jax.device_put(jax.jit(self._empty)(), jax.local_devices()[0])

  def compiles(self) -> int:
    """Compiled programs so far: a fixed number after warm_up (one per bucket + generate)."""
    jitted = (self._insert, self._generate, self._free, self._score)
    return sum(f._cache_size() for f in jitted)

  def warm_up(self) -> None:
    """Compiles every bucket's prefill and scoring and every width's generate (through slot
    0, then freed)."""
    for length in self.buckets:
      self.insert(0, [0] * length, 1, 0.0, 0, 1.0, 0)
      self.free(0)
      self.score([0] * length)
    for width in self.widths:
      for span in self.spans:
        self.state, _ = self._generate(self.params, self.state, width, span)

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
    row = (
      np.int32(length),
      np.int32(max(0, min(max_new, self.block - length))),
      np.uint32(seed % 2**32),
      np.float32(temperature),
      np.int32(top_k),
      np.float32(top_p),
      np.int32(logprobs),
    )
    self.state = self._insert(self.params, self.state, tokens, np.int32(slot), *row)
    self.filled[slot] = length

  def free(self, slot: int) -> None:
    """Ends the row in `slot` (finished, or its client left): it generates no more."""
    self.state = self._free(self.state, np.int32(slot))
    self.filled.pop(slot, None)

  def generate(self) -> "Chunk":
    """Up to `chunk` tokens for every live row, as numpy (B rows; those past the width
    used are empty)."""
    top = max(self.filled, default=0) + 1
    width = next(w for w in self.widths if w >= top)
    longest = min(max(self.filled.values(), default=0) + self.chunk, self.block)
    span = next(s for s in self.spans if s >= longest)
    self.state, out = self._generate(self.params, self.state, width, span)
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
    out = self._score(self.params, tokens)
    chosen, top_ids, top_lp = (np.asarray(x)[: len(prompt)] for x in out)
    return chosen, top_ids, top_lp

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
      return jnp.zeros(x.shape, x.dtype)

    v = self.model.cfg.padded_vocab
    return Slots(
      cache=_leaves(self._cache_shapes(b, self.block), zeros),
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

    def put(name, big, new):
      if name == "cache_index":
        return big.at[..., slot].set(length)
      at = (0,) * (big.ndim - 4) + (slot, 0, 0, 0)  # ([L,] B, N, S, H)
      return jax.lax.dynamic_update_slice(big, new.astype(big.dtype), at)

    cache = jax.tree_util.tree_map_with_path(
      lambda path, big, new: put(path[-1].key, big, new), st.cache, mutated["cache"]
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

  def _generate_fn(self, params, whole: Slots, width: int, span: int):
    """generate over rows [0, width) and cache slots [0, span), written back whole (one copy
    of that window per call of K tokens; none when it is the whole cache)."""

    def window(x, axis):
      x = jax.lax.slice_in_dim(x, 0, width, axis=axis)
      return jax.lax.slice_in_dim(x, 0, span, axis=x.ndim - 2) if x.ndim - axis == 4 else x

    st, out = self._generate_rows(params, _rows(whole, window))
    put = lambda part, axis, x: jax.lax.dynamic_update_slice(x, part, (0,) * x.ndim)
    return _rows(whole, put, st), out

  def _generate_rows(self, params, st: Slots):
    b, k = st.done_B.shape[0], self.chunk

    def body(carry):
      t, st, out = carry
      token_B = sample_rows(
        st.logits_BxV, st.made_B, st.seed_B, st.temperature_B, st.top_k_B, st.top_p_B
      )
      live_B = ~st.done_B
      chosen_B, top_lp, top_ids = _logprobs(st.logits_BxV, token_B, live_B, st.logprobs_B)
      out = (
        out[0].at[:, t].set(jnp.where(live_B, token_B, -1)),
        out[1].at[:, t].set(chosen_B),
        out[2].at[:, t].set(top_ids),
        out[3].at[:, t].set(top_lp),
      )
      stop_B = live_B & jnp.isin(token_B, jnp.array(self.stop_tokens or (-1,)))
      remaining_B = st.remaining_B - live_B
      index_B = _write_slots(st.cache, b)
      logits_Bx1xV, mutated = self.model.apply(
        {"params": params, "cache": st.cache},
        token_B[:, None],
        index_B[:, None],
        start_B=jnp.zeros((b,), jnp.int32),
        mutable=["cache"],
      )
      # Rows that were not live keep their write slot (their writes land past their end).
      cache = _leaves(
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

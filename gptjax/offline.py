"""Offline generation on the serving engine: many prompts, each reply what it would be alone.

decode.complete runs a batch in lockstep: its rows share one cache position, so a short
prompt beside a long one gets less room before the context ends, and its sliding window
moves for the whole batch at once; replies (and evaluation's BLEU and ROUGE) changed with
the batch size. Here each prompt is a row of the engine's slot cache at its own length, rows
join as others finish, a row's random numbers depend on its own seed and index only, and a
row that reaches the context's end with budget left goes on from its last half-context
(nanoGPT's sliding window, as decode.complete does, but decided per row). What remains is
floating-point rounding: a step over 1 row and over 16 runs other matrix kernels (logprobs
differ by ~1e-7 on a CPU), which only a near-tie between two tokens could turn into a
different reply.
"""

import collections
import dataclasses

import numpy as np

from gptjax import decode
from gptjax import engine as engine_lib
from gptjax.errors import UserError


@dataclasses.dataclass
class _Row:
  index: int
  prompt: list[int]
  produced: list[int] = dataclasses.field(default_factory=list)
  rounds: int = 0  # prefills so far: the first sees the prompt, later ones slide


def complete(
  eng: engine_lib.Engine,
  tokenizer,
  prompts: list[list[int]],
  max_new: int,
  sampling: decode.Sampling,
  seed: int = 0,
  stop: tuple[str, ...] = (),
) -> tuple[list[str], list[str]]:
  """(text, finish reason) of up to max_new tokens after each prompt: cut before the first
  stop string ("stop_sequence"), at the engine's stop token ("stop_token"), else "length".
  Prompt i samples with a seed made from (seed, i), whatever the engine's slot count."""
  if not all(len(p) for p in prompts):
    raise UserError("every prompt needs at least one token")
  stop = tuple(s for s in stop if s)  # "" would end every reply before it began
  block, keep = eng.block, eng.block // 2
  waiting = collections.deque(_Row(i, list(p)) for i, p in enumerate(prompts))
  running: dict[int, _Row] = {}
  texts, reasons = [""] * len(prompts), ["length"] * len(prompts)
  while waiting or running:
    for slot in range(eng.slots):
      if waiting and slot not in running:
        row = running[slot] = waiting.popleft()
        context = (row.prompt + row.produced)[-(block - 1 if row.rounds == 0 else keep) :]
        budget = min(max_new - len(row.produced), block - len(context))
        entropy = [seed % 2**64, row.index, row.rounds]  # % 2**64: a negative seed too
        rng = int(np.random.SeedSequence(entropy).generate_state(1)[0])
        eng.insert(slot, context, budget, sampling.temperature, sampling.top_k, sampling.top_p, rng)
        row.rounds += 1
    chunk = eng.generate()
    for slot, row in list(running.items()):
      new = chunk.tokens[slot][chunk.tokens[slot] >= 0].tolist()
      on_token = bool(chunk.done[slot] and chunk.stopped[slot])
      row.produced += new[:-1] if on_token and new else new
      text = tokenizer.decode(row.produced)
      hit = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
      if not (hit >= 0 or chunk.done[slot]):
        continue
      eng.free(slot)
      del running[slot]
      if hit < 0 and not on_token and len(row.produced) < max_new:
        waiting.appendleft(row)  # the context is full, the budget is not: slide
        continue
      reasons[row.index] = "stop_sequence" if hit >= 0 else "stop_token" if on_token else "length"
      texts[row.index] = text[:hit] if hit >= 0 else text
  return texts, reasons

"""The serving loop: one thread owns the engine, admits queued requests into free slots
between generate calls, and streams each request's text back as it grows.

Requests come from the HTTP handlers (serve.py) through a bounded queue (full: the caller
answers 429). Text is decoded from a request's tokens so far; text that could still become a
stop string (or is an unfinished UTF-8 character) is held back until it cannot, and each
piece carries the tokens (and logprobs) that make it, no more: after a stop string, the
tokens the chunk made beyond it are dropped. A request whose client left, or that met a stop
string, frees its slot at the next chunk.
"""

import dataclasses
import queue
import threading
import time
import traceback
from collections.abc import Callable

import numpy as np

from gptjax import engine as engine_lib


class QueueFull(Exception):
  pass


@dataclasses.dataclass
class Request:
  prompt: list[int]
  max_new: int
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  stop: tuple[str, ...] = ()
  logprobs: int = -1  # -1: none; else the token's logprob and this many alternatives
  # on_text(piece, tokens, logprobs, tops) as text becomes final; on_done(reason) once
  on_text: Callable = lambda piece, tokens, logprobs, tops: None
  on_done: Callable = lambda reason: None
  cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
  # the loop's bookkeeping
  tokens: list = dataclasses.field(default_factory=list)
  logprobs_seen: list = dataclasses.field(default_factory=list)
  tops: list = dataclasses.field(default_factory=list)
  shown: int = 0  # characters of the text already passed to on_text
  sent_tokens: int = 0
  generated: int = 0  # at the end: tokens made up to the end of the stop string (usage)
  enqueued: float = dataclasses.field(default_factory=time.perf_counter)


class Scheduler:
  def __init__(self, eng: engine_lib.Engine, tokenizer, max_queue: int = 64):
    self.engine, self.tokenizer = eng, tokenizer
    self.waiting: queue.Queue = queue.Queue(max_queue)
    self.running: dict[int, Request] = {}
    self.admitting = True
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._loop, name="gptjax-engine", daemon=True)
    self.scored: queue.Queue = queue.Queue()  # (prompt, reply queue): teacher-forced logprobs
    self.finished = {"stop": 0, "length": 0, "abort": 0, "error": 0}

  def counts(self) -> dict:
    """Requests running and waiting now, and finished so far by reason."""
    return {"running": len(self.running), "waiting": self.waiting.qsize(), **self.finished}

  def start(self) -> None:
    self._thread.start()

  def submit(self, request: Request) -> None:
    if not self.admitting:
      raise QueueFull("the server is shutting down")
    try:
      self.waiting.put_nowait(request)
    except queue.Full:
      raise QueueFull(f"{self.waiting.maxsize} requests are already waiting") from None

  def score(self, prompt: list[int]):
    """Teacher-forced logprobs of prompt (engine.score), computed on the engine thread."""
    reply: queue.Queue = queue.Queue(1)
    self.scored.put((prompt, reply))
    result = reply.get()
    if isinstance(result, Exception):
      raise result
    return result

  def shutdown(self, timeout: float) -> None:
    """Admits nothing more; finishes what runs (and waits) within timeout, then aborts."""
    self.admitting = False
    deadline = time.time() + timeout
    while (self.running or not self.waiting.empty()) and time.time() < deadline:
      time.sleep(0.05)
    self._stop.set()
    self._thread.join(timeout=10)
    for request in list(self.running.values()) + _drain(self.waiting):
      self._done(request, "abort")

  # --- the engine thread ------------------------------------------------------------------

  def _loop(self) -> None:
    while not self._stop.is_set():
      self._score_pending()
      self._admit()
      if not self.running:
        time.sleep(0.002)
        continue
      try:
        chunk = self.engine.generate()
        for slot, request in list(self.running.items()):
          self._advance(slot, request, chunk)
      except Exception as e:  # fail what runs, with the reason, rather than hang every client
        traceback.print_exc()
        for slot, request in list(self.running.items()):
          del self.running[slot]
          try:
            self.engine.free(slot)
          except Exception:  # its state may be gone with the failed call: the slot is lost
            pass
          self._done(request, f"error: the engine failed ({type(e).__name__}: {e})")

  def _score_pending(self) -> None:
    while not self.scored.empty():
      prompt, reply = self.scored.get()
      try:
        reply.put(self.engine.score(prompt))
      except Exception as e:  # a bad prompt fails its request, never the loop
        reply.put(e)

  def _admit(self) -> None:
    free = [s for s in range(self.engine.slots) if s not in self.running]
    while free and not self.waiting.empty():
      request = self.waiting.get_nowait()
      if request.cancelled.is_set():
        self._done(request, "abort")
        continue
      slot = free.pop(0)
      try:
        self.engine.insert(
          slot,
          request.prompt,
          request.max_new,
          request.temperature,
          request.top_k,
          request.top_p,
          request.seed,
          request.logprobs,
        )
      except Exception as e:  # checked before queueing; a failure here ends this request only
        self._done(request, f"error: {e}")
        free.insert(0, slot)
        continue
      self.running[slot] = request

  def _advance(self, slot: int, request: Request, chunk: engine_lib.Chunk) -> None:
    row = chunk.tokens[slot]
    n = int(np.sum(row >= 0))
    new = row[:n].tolist()
    if chunk.stopped[slot] and chunk.done[slot] and new:
      new, n = new[:-1], n - 1  # the end-of-text token itself is not part of the text
    request.tokens += new
    request.logprobs_seen += chunk.logprobs[slot, :n].tolist()
    if request.logprobs > 0:
      k = request.logprobs
      request.tops += [
        dict(zip(chunk.top_ids[slot, i, :k].tolist(), chunk.top_logprobs[slot, i, :k].tolist()))
        for i in range(n)
      ]
    text = whole = self.tokenizer.decode(request.tokens)
    hits = [(i, len(s)) for i, s in ((text.find(s), s) for s in request.stop) if i >= 0]
    hit, stop_length = min(hits, default=(-1, 0))
    finished = bool(chunk.done[slot]) or hit >= 0 or request.cancelled.is_set()
    request.generated = len(request.tokens)
    if hit >= 0:
      text = text[:hit]
      request.generated = self._covering(request, hit + stop_length, whole)
    safe = len(text) if finished else _safe_length(text, request.stop)
    upto = self._covering(request, safe, whole) if hit >= 0 or not finished else len(request.tokens)
    if safe > request.shown or upto > request.sent_tokens:
      self._emit(request, text[request.shown : safe], upto)
      request.shown = safe
    if finished:
      self.engine.free(slot)
      del self.running[slot]
      if request.cancelled.is_set():
        reason = "abort"
      else:
        reason = "stop" if hit >= 0 or chunk.stopped[slot] else "length"
      self._done(request, reason)

  def _covering(self, request: Request, chars: int, whole: str) -> int:
    """How many of the request's tokens it takes to make the first `chars` characters of its
    text, `whole` (whole characters: a token that ends in a cut one does not count as making
    it). Usually all of them, found without decoding; else a binary search (the text's
    length only grows with its tokens), a few decodes."""
    if chars >= len(whole) and not whole.endswith("\ufffd"):
      return len(request.tokens)
    lo, hi = request.sent_tokens, len(request.tokens)
    while lo < hi:
      mid = (lo + hi) // 2
      if len(self.tokenizer.decode(request.tokens[:mid]).rstrip("\ufffd")) >= chars:
        hi = mid
      else:
        lo = mid + 1
    return lo

  def _emit(self, request: Request, piece: str, upto: int) -> None:
    """Passes piece with the tokens (and their logprobs) that make it."""
    start, request.sent_tokens = request.sent_tokens, upto
    tops = request.tops[start:upto] if request.logprobs > 0 else []
    request.on_text(piece, request.tokens[start:upto], request.logprobs_seen[start:upto], tops)

  def _done(self, request: Request, reason: str) -> None:
    self.finished["error" if reason.startswith("error") else reason] += 1
    request.on_done(reason)


def _safe_length(text: str, stops) -> int:
  """How much of text is final: not a possible start of a stop string, nor a character cut
  between two tokens (decoded as U+FFFD)."""
  n = len(text.rstrip("\ufffd"))
  for stop in stops:
    for k in range(min(len(stop) - 1, n), 0, -1):
      if text[:n].endswith(stop[:k]):
        n -= k
        break
  return n


def _drain(q: queue.Queue) -> list:
  out = []
  while not q.empty():
    out.append(q.get_nowait())
  return out

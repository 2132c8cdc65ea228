"""The serving loop without a model: a scripted engine emits fixed tokens in chunks, so what
each request is told (pieces, their tokens and logprobs, usage, finish reasons and the
counts) is checked exactly, whatever the chunk boundaries."""

import threading

import numpy as np
import pytest

from gptjax import engine, row_sampling, scheduler


class Words:
  """A tokenizer of multi-character tokens (as BPE's are); id 0 is end of text."""

  pieces = ["<eot>", "RO", "MEO", ":", " I", " sh", "all", " go", "\n", "x", " now"]
  eot_id, vocab_size = 0, 11

  def decode(self, ids):
    return "".join(self.pieces[i] for i in ids)


class Scripted:
  """An engine whose every row replays `script` (token ids), `chunk` tokens per call."""

  def __init__(self, script, chunk, slots=2):
    self.script, self.chunk, self.slots = script, chunk, slots
    self.at, self.budget = {}, {}

  def insert(self, slot, prompt, max_new, *_):
    self.at[slot], self.budget[slot] = 0, max_new

  def free(self, slot):
    del self.at[slot]

  def generate(self):
    tokens = np.full((self.slots, self.chunk), -1, np.int32)
    done, stopped = np.zeros(self.slots, bool), np.zeros(self.slots, bool)
    for slot, at in self.at.items():
      end = min(at + self.chunk, self.budget[slot], len(self.script))
      row = self.script[at:end]
      row = row[: row.index(0) + 1] if 0 in row else row  # a stop token ends the row
      tokens[slot, : len(row)] = row
      self.at[slot] = end
      stopped[slot] = 0 in row
      done[slot] = stopped[slot] or end >= self.budget[slot] or end >= len(self.script)
    lps = -np.arange(1, self.chunk + 1, dtype=np.float32)[None].repeat(self.slots, 0) / 10
    top_ids = np.zeros((self.slots, self.chunk, row_sampling.TOP), np.int32)
    return engine.Chunk(tokens, lps, top_ids, top_ids.astype(np.float32), done, stopped)


def _run(script, chunk, max_new=20, stop=(), logprobs=0, cancel_after=None):
  """Runs one request to its end on the engine thread; returns what it was told."""
  sched = scheduler.Scheduler(Scripted(script, chunk), Words())
  told, done = [], threading.Event()
  reasons = []

  def on_text(piece, tokens, lps, tops):
    told.append((piece, tokens, lps))
    if cancel_after is not None and len(told) >= cancel_after:
      request.cancelled.set()

  request = scheduler.Request(
    [1], max_new, stop=stop, logprobs=logprobs, on_text=on_text,
    on_done=lambda reason: (reasons.append(reason), done.set()),
  )  # fmt: skip
  sched.start()
  sched.submit(request)
  assert done.wait(10)
  sched.shutdown(timeout=1)
  _check_aligned(told)
  return told, reasons, request, sched


def _check_aligned(told):
  """After every piece, the tokens sent so far make the text sent so far, and the last of
  them is needed to make it (a token may carry more than its piece: "I sh" for "I ")."""
  text, tokens = "", []
  for piece, new, lps in told:
    assert len(new) == len(lps)
    text, tokens = text + piece, tokens + new
    assert Words().decode(tokens).startswith(text), (text, tokens)
    if new:
      assert len(Words().decode(tokens[:-1])) < len(text), (text, tokens)


SCRIPT = [2, 3, 4, 5, 6, 7, 8, 2, 10]  # "MEO: I shall go\nMEO now"


@pytest.mark.parametrize("chunk", [1, 2, 3, 8])
def test_a_stop_string_cuts_text_tokens_logprobs_and_usage_alike(chunk):
  told, reasons, request, _ = _run(SCRIPT, chunk, stop=("shall",))
  text = "".join(piece for piece, _, _ in told)
  tokens = [t for _, ts, _ in told for t in ts]
  assert text == "MEO: I " and reasons == ["stop"]
  # the tokens that make the text ("MEO: I sh"), none of the chunk's beyond; usage runs to
  # the stop string's end ("MEO: I shall")
  assert tokens == [2, 3, 4, 5] and request.generated == 5


@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_without_a_stop_every_token_is_passed_once_with_its_text(chunk):
  told, reasons, request, sched = _run(SCRIPT, chunk)
  tokens = [t for _, ts, _ in told for t in ts]
  assert tokens == SCRIPT and "".join(p for p, _, _ in told) == Words().decode(SCRIPT)
  assert reasons == ["length"] and request.generated == len(SCRIPT)
  assert sched.counts()["length"] == 1


def test_end_of_text_is_a_stop_and_not_part_of_the_text():
  told, reasons, request, _ = _run([2, 3, 0, 5], 2)
  assert "".join(p for p, _, _ in told) == "MEO:" and reasons == ["stop"]
  assert [t for _, ts, _ in told for t in ts] == [2, 3]


def test_text_that_may_start_a_stop_string_waits_with_its_tokens():
  told, reasons, _, _ = _run(SCRIPT, 1, stop=("\nMEO!",))  # "\n", "\nMEO" could start it
  # "\n" and "\nMEO" waited, each with its tokens, until " now" ruled the stop string out
  assert [(p, ts) for p, ts, _ in told][-2:] == [(" go", [7]), ("\nMEO now", [8, 2, 10])]
  assert reasons == ["length"]


def test_an_engine_failure_ends_the_running_requests_with_its_reason():
  class Failing(Scripted):
    def generate(self):
      raise RuntimeError("device lost")

  sched = scheduler.Scheduler(Failing(SCRIPT, 2), Words())
  ended, done = [], threading.Event()
  sched.start()
  sched.submit(scheduler.Request([1], 5, on_done=lambda r: (ended.append(r), done.set())))
  assert done.wait(10)
  assert ended == ["error: the engine failed (RuntimeError: device lost)"]
  assert sched.counts()["error"] == 1 and not sched.running
  sched.shutdown(timeout=1)


def test_queued_requests_that_end_unrun_are_counted():
  sched = scheduler.Scheduler(Scripted(SCRIPT, 2, slots=1), Words(), max_queue=4)
  ended = []
  requests = [scheduler.Request([1], 5, on_done=ended.append) for _ in range(3)]
  for r in requests:
    sched.submit(r)
  sched._stop.set()
  sched.start()  # an engine thread that has stopped: nothing runs but what the test calls
  requests[0].cancelled.set()  # its client left while it waited
  sched._admit()  # the engine thread's admission, run here: slot 0 to request 1
  sched.shutdown(timeout=0)  # request 1 runs, request 2 waits: both aborted
  assert ended == ["abort", "abort", "abort"] and sched.counts()["abort"] == 3


def test_a_character_split_across_tokens_waits_for_its_last_byte():
  class Bytes(Words):
    pieces = [b"", b"a", "\u00e9".encode()[:1], "\u00e9".encode()[1:], b"b"]

    def decode(self, ids):
      return b"".join(self.pieces[i] for i in ids).decode("utf-8", "replace")

  sched = scheduler.Scheduler(Scripted([1, 2, 3, 4], 1), Bytes())
  told, done = [], threading.Event()
  request = scheduler.Request(
    [1], 10, on_text=lambda p, t, *_: told.append((p, t)), on_done=lambda r: done.set()
  )
  sched.start()
  sched.submit(request)
  assert done.wait(10)
  sched.shutdown(timeout=1)
  assert told == [("a", [1]), ("\u00e9", [2, 3]), ("b", [4])]

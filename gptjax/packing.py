"""Packing: several fine-tuning examples share one row of the (B, T+1) batch.

A row holds whole examples back to back (an example of L tokens takes L of the T+1 slots),
then padding. The model sees, per input position t, its segment (1, 2, ... in the row; 0 for
padding), so attention never crosses examples, and its position within the segment, so
learned positions and RoPE restart at every example. The loss weight of target t is the
example's weight for that token when slots t and t+1 belong to the same example, else 0: an
example's last token never learns to predict the next example's first.

Examples longer than a row lose their oldest context first (the reply comes last in a
conversation); a reply longer than a row keeps its start. Both are counted as truncated, and
so is an example whose oldest context is cut to fill a row that would otherwise stay half
empty (its reply and one token of context always stay).
"""

import bisect
import dataclasses

import numpy as np


@dataclasses.dataclass
class Packed:
  tokens: np.ndarray  # (R, T+1) int32: inputs [:, :-1], targets [:, 1:]
  weights: np.ndarray  # (R, T) float32: loss weight of each target
  segments: np.ndarray  # (R, T) int32: example of each input, from 1; 0 is padding
  positions: np.ndarray  # (R, T) int32: position of each input within its example
  slot_segments: np.ndarray  # (R, T+1) int32: example of each token slot (0: padding)
  truncated: int  # examples cut to fit a row
  members: list  # per row, the input index of the example in each segment (segment s: [s-1])

  def real_share(self) -> np.ndarray:
    """(R,): the share of each row's input slots that hold example tokens, not padding."""
    return (self.segments > 0).mean(axis=1)


MIN_FILL = 0.85  # rows less full than this are dissolved or merged where examples allow
# Bounds on the repair passes (each step of them scans every row or example): rows to try
# dissolving, and candidates per row to top up from. Linear time for any dataset size.
_DISSOLVE_AT_MOST = 1000
_MERGE_SCAN = 200  # partners tried per sparse row
_TOP_UP_SCAN = 5000


def pack(examples, block_size: int, pad_id: int = 0, cut_to_fill: bool = True) -> Packed:
  """Packs (ids, weights) examples into rows of block_size + 1 tokens: best fit, longest
  first, so rows fill up; a row's examples keep their input order, and rows come in the
  order of their first examples (the epoch's shuffle permutes them).

  Examples just over half a row leave rows half empty. With cut_to_fill, each row under
  MIN_FILL full is then dissolved into the other rows' free room, or else merged with
  another such row; an example moved so keeps its trained tokens and at least one token of
  context, and loses its oldest context if it must (counted as truncated). Evaluation
  passes cut_to_fill=False: every example whole, its loss as if alone.
  """
  width = block_size + 1
  kept, index, was_cut = [], [], set()  # was_cut: indices into kept of shortened examples
  for i, (ids, weights) in enumerate(examples):
    if len(ids) >= 2:  # something to predict
      if len(ids) > width:
        ids, weights = cut(ids, weights, width)
        was_cut.add(len(kept))
      kept.append([np.asarray(ids, np.int32), np.asarray(weights, np.float32)])
      index.append(i)
  rows, room = _best_fit([len(ids) for ids, _ in kept], width)
  if cut_to_fill:
    repair = _Repair(kept, rows, room, width, was_cut)
    repair.dissolve()
    repair.merge()
    repair.top_up()
  # Segments in input order, and rows by their first example: best fit fills them longest
  # first, and a validation subset (the first eval_batches rows) must not be the longest.
  rows = sorted((sorted(r) for r in rows if r), key=lambda r: index[r[0]])
  examples_by_row = [[kept[e] for e in r] for r in rows]
  members = [[index[e] for e in r] for r in rows]
  return _arrays(examples_by_row, width, pad_id, len(was_cut), members)


def _best_fit(lengths: list[int], width: int):
  """Best fit decreasing: each example, longest first, into the row with the least room that
  holds it, else a new row -> (rows as lists of example indices, free room per row).

  Rows are kept in buckets by free room, and a count tree over the room values finds the
  smallest one >= n in O(log width): linear in the examples, where scanning every row
  would be quadratic (a million conversations)."""
  size = 1 << width.bit_length()  # leaves: room values 0 .. width
  count = [0] * (2 * size)  # rows per room value, summed up the tree
  buckets = [[] for _ in range(width + 1)]

  def update(value: int, delta: int) -> None:
    i = value + size
    while i:
      count[i] += delta
      i //= 2

  def smallest_at_least(n: int) -> int | None:
    i = n + size
    if not count[i]:
      while i > 1 and (i % 2 or not count[i + 1]):  # up to a left child with a right sibling
        i //= 2
      if i <= 1:
        return None
      i += 1
      while i < size:  # down to its leftmost leaf with rows
        i = 2 * i if count[2 * i] else 2 * i + 1
    return i - size

  rows, room = [], []
  for e in sorted(range(len(lengths)), key=lambda e: -lengths[e]):
    value = smallest_at_least(lengths[e])
    if value is None:
      rows.append([])
      room.append(width)
      r = len(rows) - 1
    else:
      r = buckets[value].pop()
      update(value, -1)
    rows[r].append(e)
    room[r] -= lengths[e]
    if room[r] >= 2:  # an example has at least two tokens
      buckets[room[r]].append(r)
      update(room[r], 1)
  return rows, np.asarray(room, np.int64)


@dataclasses.dataclass
class _Repair:
  """The passes that fill rows under MIN_FILL after best fit, over shared state: examples
  (ids, weights; cut in place), rows (example indices), free room per row, and the
  examples shortened so far. needed[e]: the fewest tokens example e may be cut to (its
  trained tokens and one of context; a cut of older context leaves it unchanged)."""

  kept: list
  rows: list
  room: np.ndarray
  width: int
  was_cut: set

  def __post_init__(self):
    self.needed = [_needed(w) for _, w in self.kept]
    self.sparse_room = (1 - MIN_FILL) * self.width  # more free room than this: sparse

  def sparse(self) -> list[int]:
    """Rows under MIN_FILL, emptiest first."""
    order = np.argsort(-self.room, kind="stable")
    return [r for r in order if self.rows[r] and self.room[r] > self.sparse_room]

  def keep_last(self, e: int, n: int) -> None:
    if n < len(self.kept[e][0]):
      self.kept[e] = [self.kept[e][0][-n:], self.kept[e][1][-n:]]
      self.was_cut.add(e)

  def dissolve(self) -> None:
    """Moves each sparse row's examples into other rows' room where they fit (whole, or
    cut to their needed tokens at least)."""
    for r in self.sparse()[:_DISSOLVE_AT_MOST]:
      trial, plan = self.room.copy(), []
      trial[r] = -1  # not into itself
      for e in sorted(self.rows[r], key=lambda e: -len(self.kept[e][0])):
        n = len(self.kept[e][0])
        fits = np.flatnonzero(trial >= n)
        target = int(fits[0]) if fits.size else int(np.argmax(trial))
        take = min(n, int(trial[target]))
        if take < self.needed[e]:
          break
        trial[target] -= take
        plan.append((e, target, take))
      if len(plan) == len(self.rows[r]):
        for e, target, take in plan:
          self.keep_last(e, take)
          self.rows[target].append(e)
        self.rows[r], self.room[:], self.room[r] = [], trial, 0

  def merge(self) -> None:
    """Merges pairs of sparse rows (emptiest first; a pair fits when the needed tokens of
    both do), cutting the examples with the most context to spare."""
    active = self.sparse()
    need = {r: sum(self.needed[e] for e in self.rows[r]) for r in active}
    while active:
      r = active.pop(0)
      partner = next((q for q in active[:_MERGE_SCAN] if need[r] + need[q] <= self.width), None)
      if partner is None:
        continue
      members = self.rows[r] + self.rows[partner]
      lengths = {e: len(self.kept[e][0]) for e in members}
      excess = sum(lengths.values()) - self.width
      for e in sorted(members, key=lambda e: self.needed[e] - lengths[e]):  # most spare first
        trim = max(0, min(excess, lengths[e] - self.needed[e]))
        lengths[e], excess = lengths[e] - trim, excess - trim
      for e in members:
        self.keep_last(e, lengths[e])
      self.rows[r], self.rows[partner] = members, []
      self.room[r], self.room[partner] = self.width - sum(lengths.values()), 0
      need[r] += need[partner]
      active.remove(partner)
      if self.room[r] > self.sparse_room:
        active.insert(0, r)  # still sparse: merge on

  def top_up(self) -> None:
    """Fills each still-sparse row with examples from rows that stay MIN_FILL full without
    them: whole ones first (longest first), then cut ones (the least to cut first)."""
    row_of = {e: r for r, members in enumerate(self.rows) for e in members}
    by_length = sorted(row_of, key=lambda e: -len(self.kept[e][0]))
    negated = [-len(self.kept[e][0]) for e in by_length]
    spare = self.width - self.room - MIN_FILL * self.width  # what a donor row can give
    longest = bisect.bisect_left(negated, -int(spare.max(initial=0)))  # no donor gives more
    for r in self.sparse()[:_DISSOLVE_AT_MOST]:
      for whole in (True, False):
        start = bisect.bisect_left(negated, -int(self.room[r]))  # the first that fits whole
        candidates = (
          by_length[max(start, longest) : max(start, longest) + _TOP_UP_SCAN]
          if whole
          else by_length[max(longest, start - _TOP_UP_SCAN) : start][::-1]
        )
        for e in candidates:
          if self.room[r] <= self.sparse_room:
            break
          n, donor = len(self.kept[e][0]), row_of[e]
          if donor == r or (n if whole else self.needed[e]) > self.room[r]:
            continue
          if self.width - self.room[donor] - n < MIN_FILL * self.width:
            continue  # the donor would go sparse
          take = min(n, int(self.room[r]))
          self.keep_last(e, take)
          self.rows[donor].remove(e)
          self.rows[r].append(e)
          self.room[donor], self.room[r], row_of[e] = self.room[donor] + n, self.room[r] - take, r


def cut(ids, weights, width: int):
  """An over-long example cut to `width` tokens: its oldest context goes first, earlier
  turns included; a last reply too long even alone keeps its start (after one token of
  context), where the speaker and the form of a reply are, rather than its tail."""
  if len(ids) <= width:
    return ids, weights
  trained = np.flatnonzero(np.asarray(weights))
  start = len(ids) - width
  if trained.size:  # the last reply: the last run of trained targets
    gaps = np.flatnonzero(np.diff(trained) > 1)
    last = int(trained[gaps[-1] + 1] if gaps.size else trained[0])
    if 1 < last <= start:  # (a reply at 0 or 1 has no context: everything is trained)
      start = last - 1
  return ids[start : start + width], weights[start : start + width]


def _needed(weights) -> int:
  """The shortest end of an example that keeps every trained target and one token of
  context before the first (weights[i] is the weight of token i as a target)."""
  trained = np.flatnonzero(weights)
  return len(weights) - trained[0] + 1 if trained.size else len(weights)


def _arrays(rows, width: int, pad_id: int, truncated: int, members: list) -> Packed:
  n = len(rows)
  tokens = np.full((n, width), pad_id, np.int32)
  token_weights = np.zeros((n, width), np.float32)
  segment_of_slot = np.zeros((n, width), np.int32)
  position_of_slot = np.zeros((n, width), np.int32)
  for r, examples in enumerate(rows):
    start = 0
    for s, (ids, weights) in enumerate(examples, 1):
      end = start + len(ids)
      tokens[r, start:end], token_weights[r, start:end] = ids, weights
      segment_of_slot[r, start:end] = s
      position_of_slot[r, start:end] = np.arange(len(ids))
      start = end
  same = (segment_of_slot[:, :-1] == segment_of_slot[:, 1:]) & (segment_of_slot[:, 1:] > 0)
  return Packed(
    tokens=tokens,
    weights=np.where(same, token_weights[:, 1:], 0.0).astype(np.float32),
    segments=segment_of_slot[:, :-1],
    positions=position_of_slot[:, :-1],
    slot_segments=segment_of_slot,
    truncated=truncated,
    members=members,
  )

"""Packing: several fine-tuning examples share one row of the (B, T+1) batch.

A row holds whole examples back to back (an example of L tokens takes L of the T+1 slots),
then padding. The model sees, per input position t, its segment (1, 2, ... in the row; 0 for
padding), so attention never crosses examples, and its position within the segment, so
learned positions and RoPE restart at every example. The loss weight of target t is the
example's weight for that token when slots t and t+1 belong to the same example, else 0: an
example's last token never learns to predict the next example's first.

Examples longer than a row lose their oldest context first (the reply comes last in a
conversation); a reply longer than a row keeps its start. Both are counted as truncated; so is an example whose oldest context is cut to fill a row that
would otherwise stay half empty (its reply and one token of context always stay).
"""

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


def pack(examples, block_size: int, pad_id: int = 0, cut_to_fill: bool = True) -> Packed:
  """Packs (ids, weights) examples into rows of block_size + 1 tokens: first fit, longest
  first, so rows fill up; a row's examples keep their input order (the epoch's shuffle
  permutes rows).

  An example that fits no row whole goes, before a new row is opened, into the roomiest row
  that can take its trained tokens and some of their context: its oldest context is cut
  (counted as truncated). Examples just over half a row would otherwise leave rows half empty.
  cut_to_fill=False never cuts an example that fits a row (evaluation: losses as if alone).
  """
  width = block_size + 1
  kept, index, truncated = [], [], 0
  for i, (ids, weights) in enumerate(examples):
    if len(ids) > width:
      (ids, weights), truncated = cut(ids, weights, width), truncated + 1
    if len(ids) >= 2:  # something to predict
      kept.append([np.asarray(ids, np.int32), np.asarray(weights, np.float32)])
      index.append(i)
  room = np.zeros(0, np.int64)
  row_of = np.zeros(len(kept), np.int64)
  for e in sorted(range(len(kept)), key=lambda e: -len(kept[e][0])):
    ids, weights = kept[e]
    fits = np.flatnonzero(room >= len(ids))
    if fits.size:
      row_of[e] = fits[0]
    elif cut_to_fill and room.size and room.max() >= _needed(weights):
      row_of[e] = int(np.argmax(room))
      kept[e] = [ids[-room[row_of[e]] :], weights[-room[row_of[e]] :]]
      truncated += 1
    else:
      room, row_of[e] = np.append(room, width), len(room)
    room[row_of[e]] -= len(kept[e][0])
  rows, members = [[] for _ in range(len(room))], [[] for _ in range(len(room))]
  for e, example in enumerate(kept):
    rows[row_of[e]].append(example)
    members[row_of[e]].append(index[e])
  return _arrays(rows, width, pad_id, truncated, members)


def cut(ids, weights, width: int):
  """An over-long example cut to `width` tokens: its oldest context goes first; a reply too
  long even alone keeps its start (after one token of context), where the speaker and the
  form of a reply are, rather than its tail."""
  trained = np.flatnonzero(np.asarray(weights))
  start = len(ids) - width
  if trained.size and trained[0] - 1 < start:
    start = max(int(trained[0]) - 1, 0)
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

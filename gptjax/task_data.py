"""Task data for fine-tuning: JSONL files of conversations, read, encoded by the chat
template (ids and loss weights), packed into rows and served as random-access batches.

One JSON object per line, either shape:
  {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
  {"prompt": "...", "completion": "..."}   (field names configurable) -> a user turn and the
                                            assistant's reply
A conversation must hold at least one assistant turn (what fine-tuning learns). Every fault
is a UserError naming the file and line.
"""

import dataclasses
import functools
import hashlib
import json
import os

import numpy as np
from grain.experimental import index_shuffle

from gptjax import chat_template, packing, storage
from gptjax.chat_template import ROLES
from gptjax.errors import UserError
from gptjax.tokenizer import UnknownCharacter


class Records(list):
  """Conversations in file order; where[i] is conversation i's "file:line" (for errors)."""

  def __init__(self, conversations, where):
    super().__init__(conversations)
    self.where = list(where)

  def part(self, start, stop) -> "Records":
    return Records(self[start:stop], self.where[start:stop])


def read(
  pattern: str,
  prompt_field: str = "prompt",
  completion_field: str = "completion",
  flag: str = "config.data.path",
) -> Records:
  """Conversations (lists of {"role", "content"}) from a JSONL file or glob, in file order."""
  files = storage.glob(pattern)
  if not files:
    raise UserError(f"no file matches {flag}={pattern!r}; pass a JSONL file or a glob of them")
  out, where = [], []
  for path in files:
    if storage.isdir(path):
      raise UserError(
        f"{flag}={pattern!r}: {path} is a directory; pass a JSONL file or a glob such as "
        f"{os.path.join(path, '*.jsonl')}"
      )
    start = len(out)
    with storage.open(path, "rb") as f:  # decoded line by line, so a bad byte's line can be named
      for number, raw in enumerate(f, 1):
        try:
          line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as e:
          raise UserError(
            f"{path}:{number}: not UTF-8 text ({e.reason}); save the file as UTF-8"
          ) from None
        if line.strip():
          where.append(f"{path}:{number}")
          out.append(_conversation(line, where[-1], prompt_field, completion_field))
    if len(out) == start:
      raise UserError(f"{path} holds no records; one JSON object per line is expected")
  return Records(out, where)


def _conversation(line: str, where: str, prompt_field: str, completion_field: str) -> list:
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
  if not isinstance(record, dict):
    raise UserError(f"{where}: a record is a JSON object, not a {type(record).__name__}")
  if "messages" in record:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
      raise UserError(f'{where}: "messages" must be a non-empty list of turns')
    turns = [_turn(m, f"{where}: turn {i + 1}") for i, m in enumerate(messages)]
    if not any(t["role"] == "assistant" and t.get("weight", 1) for t in turns):
      raise UserError(f"{where}: the conversation has no assistant turn (of weight 1) to learn")
    return turns
  if prompt_field in record and completion_field in record:
    for field in (prompt_field, completion_field):
      if not isinstance(record[field], str):
        raise UserError(f'{where}: "{field}" must be a string')
      _check_text(record[field], f"{where}: {field!r}")
    turns = [("user", prompt_field), ("assistant", completion_field)]
    return [{"role": role, "content": record[field]} for role, field in turns]
  raise UserError(
    f'{where}: a record needs "messages", or "{prompt_field}" and "{completion_field}" '
    f"(it has {', '.join(map(repr, record)) or 'no fields'}); name other fields with the "
    "prompt/completion field settings"
  )


def _turn(message, where: str) -> dict:
  """A turn as the template reads it: OpenAI's "developer" is the system role, and an
  assistant turn with "weight": 0 (OpenAI's fine-tuning format) is context, not trained."""
  if not isinstance(message, dict) or "role" not in message or "content" not in message:
    raise UserError(f'{where}: a turn is an object with "role" and "content"')
  role = "system" if message["role"] == "developer" else message["role"]
  if role not in ROLES:
    raise UserError(f"{where}: unknown role {role!r}; roles are {', '.join(ROLES)}, developer")
  if not isinstance(message["content"], str):
    raise UserError(f'{where}: "content" must be a string')
  _check_text(message["content"], where)
  weight = message.get("weight", 1)
  if weight not in (0, 1) or role != "assistant" and "weight" in message:
    raise UserError(f'{where}: "weight" is 0 or 1, on assistant turns only')
  return {"role": role, "content": message["content"], **({"weight": 0} if not weight else {})}


def _check_text(text: str, where: str) -> None:
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:  # JSON's \ud83d alone: half of an emoji, cut
    raise UserError(
      f"{where}: {e.object[e.start : e.end]!r} is half a UTF-16 surrogate pair, not text; "
      "fix or drop the record"
    ) from None


def splits(data_config) -> dict[str, list]:
  """{"train", "val"} conversations: data.path and data.val_path, or, without val_path, the
  last val_fraction of data.path's records (in file order) held out."""
  fields = (data_config.prompt_field, data_config.completion_field)
  train = read(data_config.path, *fields)
  if data_config.val_path:
    return {"train": train, "val": read(data_config.val_path, *fields, "config.data.val_path")}
  cut = int(len(train) * (1 - data_config.val_fraction))
  if not 0 < cut < len(train):
    raise UserError(
      f"{data_config.path} holds {len(train)} records, too few to hold out "
      f"val_fraction={data_config.val_fraction}; pass --config.data.val_path=FILE"
    )
  return {"train": train.part(0, cut), "val": train.part(cut, len(train))}


def identity(data_config) -> dict:
  """What data a run trains on, for the resume check: the source; TFDS's dataset; text's
  files (the pattern and their bytes: another file, or one cut short, shows) and split; task
  data's files, fields, loss switch and template (a file by a hash of its text)."""
  if data_config.source == "tfds":
    return {"source": "tfds", "tfds_name": data_config.tfds_name}
  if data_config.source == "text":
    files = storage.glob(data_config.path) if data_config.path else []  # validate() says so
    split = {k: data_config[k] for k in ("path", "val_fraction")}
    return {"source": "text", **split, "bytes": sum(storage.size(f) for f in files)}
  template = data_config.chat_template
  if template not in chat_template.BUILTIN:
    source = chat_template.load(template).source
    template = f"{template} (sha256 {hashlib.sha256(source.encode()).hexdigest()[:12]})"
  keys = ("path", "val_path", "prompt_field", "completion_field", "train_on_all")
  if not data_config.val_path:  # the split is cut from path: moving it moves records across
    keys += ("val_fraction",)
  return {"source": "task", **{k: data_config[k] for k in keys}, "chat_template": template}


def texts(data_config, conversations) -> list[str]:
  """The rendered text of each conversation (what a char or BPE tokenizer is built from)."""
  template = chat_template.load(data_config.chat_template)
  return [template.render(m).replace(chat_template.EOT, "") for m in conversations]


@dataclasses.dataclass
class Stats:
  """What packing a split did, for the log."""

  examples: int
  skipped: int  # no trained token (nothing to learn): left out
  packed: packing.Packed

  def line(self, split: str) -> str:
    share = self.packed.real_share()
    return (
      f"{split} task data: {self.examples} conversations in {len(share)} rows of "
      f"{self.packed.tokens.shape[1]} tokens, {share.mean():.1%} real tokens (lowest row "
      f"{share.min():.1%}); {self.packed.truncated} cut to fit (oldest context first), "
      f"{self.skipped} without a trained token skipped"
    )


def encode_and_pack(
  conversations, tokenizer, data_config, block_size: int, cut_to_fill: bool = True
) -> Stats:
  """Encoded by the template and packed (validation: cut_to_fill=False, so every example's
  loss is as if alone and equals --mode=evaluate's)."""
  template = chat_template.load(data_config.chat_template)
  where = getattr(conversations, "where", None) or [
    f"{data_config.path}: record {i + 1}" for i in range(len(conversations))
  ]
  examples = []
  for messages, at in zip(conversations, where):
    try:
      examples.append(template.encode(messages, tokenizer, data_config.train_on_all))
    except UnknownCharacter as e:
      raise UserError(
        f"{at}: {e.problem}, which this run's data must use; remove the character (or "
        "start from a vocabulary that has it)"
      ) from None
    except UserError as e:
      raise UserError(f"{at}: {e}") from None
  trained = [(ids, w) for ids, w in examples if w[1:].any()]  # weight of ids[0] never counts
  if not trained:
    raise UserError(
      f"no conversation in {data_config.path} has a trained token under chat template "
      f"{template.name}; check the template and the records' roles"
    )
  packed = packing.pack(trained, block_size, cut_to_fill=cut_to_fill)
  return Stats(len(examples), len(examples) - len(trained), packed)


class PackedBatches:
  """Random-access batches of packed rows: `get(step, rows)` -> {"tokens" (B, T+1),
  "weights", "segments", "positions" (B, T)}, a pure function of (seed, split, step).

  train: epoch by epoch, every row once in a shuffled order (grain's index_shuffle).
  val: the rows in order, num_batches of them, the last batch padded with empty rows."""

  def __init__(self, packed: packing.Packed, batch_size: int, seed: int, split: str):
    self.packed, self.batch_size, self.seed, self.split = packed, batch_size, seed, split
    self.num_rows = len(packed.tokens)
    self.num_batches = -(-self.num_rows // batch_size)

  @functools.lru_cache(maxsize=8)  # noqa: B019 (lives as long as the run)
  def _epoch_seed(self, epoch: int) -> int:
    return int(np.random.SeedSequence((self.seed, 2, epoch)).generate_state(1)[0])

  def _row(self, i: int) -> int:
    if self.split != "train":
      return i if i < self.num_rows else -1  # -1: an empty row
    epoch, j = divmod(i, self.num_rows)
    return index_shuffle(j, max_index=self.num_rows - 1, seed=self._epoch_seed(epoch), rounds=4)

  def get(self, step: int, rows: slice = slice(None)) -> dict:
    idx = np.array(
      [self._row(i) for i in range(step * self.batch_size, (step + 1) * self.batch_size)[rows]]
    )
    p, empty = self.packed, idx < 0
    take = lambda a: np.where(empty[:, None], 0, a[np.maximum(idx, 0)]).astype(a.dtype)
    return {
      "tokens": take(p.tokens),
      "weights": take(p.weights),
      "segments": take(p.segments),
      "positions": take(p.positions),
    }

"""Text sources -> token files -> batches of (B, T+1) windows.

Sources yield documents (strings): any TFDS text dataset, or local text files. Each split is
tokenized once into WORKDIR/data/<split>.bin (documents joined by the tokenizer's EOT id) and
memory-mapped, so a corpus larger than RAM works. A batch is a pure function of
(seed, split, step), so the iterator "position" is just the step and exact resume needs
nothing else.
"""

import dataclasses
import errno
import functools
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable

import jax
import numpy as np
from grain.experimental import index_shuffle

from gptjax import chat_template, storage, task_data, tfds_data
from gptjax import tokenizer as tokenizer_lib
from gptjax import workdir as workdir_lib
from gptjax.errors import UserError
from gptjax.metrics import format_bytes

_STREAM = {"train": 0, "val": 1}


class Batches:
  """Random-access batches: `batches[step]` -> int32 (batch_size, seq_len + 1).

  Sampling without replacement, epoch by epoch: an epoch cuts the token stream into
  windows at stride seq_len from a random phase and visits them in a random order (grain's
  stateless index_shuffle, O(1) memory for any corpus). Every token is seen once per epoch,
  where i.i.d. offsets (nanoGPT) would leave e^-1 of the corpus unseen after one epoch's
  worth of steps. Window i of the whole run belongs to batch i // batch_size.
  """

  def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, split: str):
    self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
    self.seed, self.split = seed, split
    slack = len(tokens) - (seq_len + 1)  # room to slide one window
    if slack < 0:
      raise UserError(
        f"the {split} split has {len(tokens)} tokens, fewer than one window of "
        f"block_size+1={seq_len + 1}; use a longer corpus or a smaller "
        "--config.model.block_size"
      )
    self.windows_per_epoch = slack // seq_len + 1
    self.max_phase = slack - (self.windows_per_epoch - 1) * seq_len  # in [0, seq_len)

  @functools.lru_cache(maxsize=8)  # noqa: B019 (Batches live as long as the run)
  # a batch spans at most two epochs; saves a hash per row
  def _epoch_seed(self, epoch: int) -> int:
    return int(np.random.SeedSequence((self.seed, _STREAM[self.split], epoch)).generate_state(1)[0])

  def starts(self, step: int, rows: slice = slice(None)) -> np.ndarray:
    """Token offsets of the windows of batch `step` (rows: this process's share)."""
    out = []
    for i in range(step * self.batch_size, (step + 1) * self.batch_size)[rows]:
      epoch, j = divmod(i, self.windows_per_epoch)
      seed = self._epoch_seed(epoch)
      window = index_shuffle(j, max_index=self.windows_per_epoch - 1, seed=seed, rounds=4)
      out.append(seed % (self.max_phase + 1) + window * self.seq_len)
    return np.asarray(out, np.int64)

  def get(self, step: int, rows: slice = slice(None)) -> np.ndarray:
    """Batch `step`, or only its `rows` (a process's share on several hosts)."""
    starts_B = self.starts(step, rows)
    return np.asarray(self.tokens[starts_B[:, None] + np.arange(self.seq_len + 1)], np.int32)

  def __getitem__(self, step: int) -> np.ndarray:
    return self.get(step)


@dataclasses.dataclass
class Data:
  tokenizer: tokenizer_lib.Tokenizer
  train: Batches | task_data.PackedBatches
  val: Batches | task_data.PackedBatches
  val_bytes_per_token: float  # UTF-8 bytes per token of the val split, for bits per byte
  notes: tuple[str, ...] = ()  # what preparing the data did, for the log


def load(config, workdir: str) -> Data:
  """Builds (or reuses) the tokenizer and token files in workdir; returns the batches."""
  data_config = config.data
  task = task_data.splits(data_config) if data_config.source == "task" else None
  docs = _sources(data_config, task)
  if task:  # a char vocabulary from every conversation: a held-out reply may hold a new letter
    both = lambda: [*docs["train"](), *docs["val"]()]
    return _task(config, _tokenizer(config, workdir, {"train": both}), task)
  tokenizer = _tokenizer(config, workdir, docs)
  out = {}
  for split in ("train", "val"):
    try:
      tokens, n_bytes = _tokenize_cached(
        docs[split],
        tokenizer,
        split,
        _fingerprint(data_config),
        storage.join(workdir, "data"),
        data_config.cache_dir,
      )
    except tokenizer_lib.UnknownCharacter as e:
      if not storage.exists(tokenizer_file(workdir)):
        raise
      raise UserError(
        f"{e.problem} of {tokenizer_file(workdir)}, which an earlier run in this workdir "
        "made from other text (its checkpoints use those ids); use a fresh --workdir, or "
        "data that vocabulary encodes"
      ) from None
    batch = config.train.batch_size
    out[split] = (Batches(tokens, batch, config.model.block_size, config.seed, split), n_bytes)
  val, val_bytes = out["val"]
  return Data(tokenizer, out["train"][0], val, val_bytes / len(val.tokens))


def _tokenizer(config, workdir: str, docs) -> tokenizer_lib.Tokenizer:
  """The workdir's own vocabulary, else the init_from run's, else one built for the data."""
  tok_path = tokenizer_file(workdir)
  if storage.exists(tok_path):  # a trained workdir keeps its vocabulary, so ids stay stable
    tokenizer = tokenizer_lib.load(tok_path)
  elif config.init_from and not config.init_from.startswith("hf:"):  # vocabulary of the weights
    tok_path = tokenizer_file(workdir_lib.run_files(config.init_from))
    tokenizer = tokenizer_lib.load(tok_path)
  else:  # saved after the first training step (save_tokenizer): a failed start leaves none
    return tokenizer_lib.build(config.data.tokenizer, tokenizer_path(config), docs["train"])
  if tokenizer.kind != config.data.tokenizer:
    raise UserError(
      f"{tok_path} holds a {tokenizer.kind} tokenizer but config.data.tokenizer="
      f"{config.data.tokenizer!r}; use a fresh --workdir"
    )
  return tokenizer


def _task(config, tokenizer, conversations: dict) -> Data:
  """Conversations encoded by the chat template and packed into rows of block_size + 1."""
  batches, notes = {}, []
  for split in ("train", "val"):
    stats = task_data.encode_and_pack(
      conversations[split], tokenizer, config.data, config.model.block_size, split == "train"
    )
    notes.append(stats.line(split))
    batches[split] = task_data.PackedBatches(
      stats.packed, config.train.batch_size, config.seed, split
    )
  val = batches["val"].packed  # bytes per scored token, as --mode=evaluate counts them
  scored = val.tokens[:, 1:][val.weights > 0]
  n_bytes = len(tokenizer.decode(scored).replace(tokenizer_lib.EOT, "").encode("utf-8"))
  return Data(tokenizer, batches["train"], batches["val"], n_bytes / len(scored), tuple(notes))


def tokenizer_file(workdir: str) -> str:
  return storage.join(workdir, "tokenizer.json")


def save_tokenizer(tokenizer, workdir: str) -> None:
  """Writes the workdir's vocabulary once (after its first training step)."""
  path = tokenizer_file(workdir)
  if not storage.exists(path):
    tokenizer_lib.save(tokenizer, path)


def save_run_files(tokenizer, config, workdir: str) -> None:
  """What a run trained with, written once after its first step: the vocabulary, and a task
  run's chat template file (chat_template.save)."""
  save_tokenizer(tokenizer, workdir)
  if config.data.source == "task":
    chat_template.save(config.data.chat_template, workdir)


def tokenizer_path(config) -> str | None:
  """data.tokenizer_path, else (for bpe) the init_from directory when it has BPE files."""
  data_config = config.data
  if data_config.tokenizer_path or data_config.tokenizer != "bpe" or not config.init_from:
    return data_config.tokenizer_path
  hf_dir = config.init_from[len("hf:") :]
  has = lambda *names: all(os.path.isfile(os.path.join(hf_dir, n)) for n in names)
  return hf_dir if has("tokenizer.json") or has("vocab.json", "merges.txt") else None


def train_texts(config) -> Iterable[str]:
  """The documents of the training split (for training a tokenizer)."""
  task = task_data.splits(config.data) if config.data.source == "task" else None
  return _sources(config.data, task)["train"]()


def _sources(data_config, task=None) -> dict[str, Callable[[], Iterable[str]]]:
  """Re-iterable sources of documents for 'train' and 'val' (task: rendered conversations)."""
  if task is not None:
    return {split: (lambda c=c: task_data.texts(data_config, c)) for split, c in task.items()}
  if data_config.source == "text":
    texts = dict(zip(("train", "val"), _text_files(data_config.path, data_config.val_fraction)))
    return {split: (lambda t=text: [t]) for split, text in texts.items()}

  # Built at first use: a run whose vocabulary and token files are already in its workdir
  # (a resume, a restart) never imports TensorFlow (~4.5 s) or opens the dataset. Both
  # splits are checked then, so a bad val_split fails before the train split is read.
  @functools.cache
  def sources():
    built = tfds_data.builder(data_config)
    return {split: tfds_data.docs(built, data_config, split) for split in ("train", "val")}

  return {split: (lambda s=split: sources()[s]()) for split in ("train", "val")}


def read_text_files(path: str, flag: str = "config.data.path") -> list[str]:
  """The contents of a file or of every file a glob matches (sorted), as UTF-8 text."""
  files = storage.glob(path)
  if not files:
    raise UserError(f"no file matches {flag}={path!r}; check the path or glob")
  texts = []
  for f in files:
    try:
      texts.append(storage.read_text(f))
    except (OSError, UnicodeDecodeError) as e:
      raise UserError(f"cannot read text file {f}: {e}; pass a readable UTF-8 file") from None
  return texts


def _text_files(path: str, val_fraction: float) -> tuple[str, str]:
  """Reads a file or glob; the last val_fraction of the characters is the val split."""
  text = "".join(read_text_files(path))
  if not text.strip():
    raise UserError(f"config.data.path={path!r} is empty; point it at a non-empty text file")
  cut = int(len(text) * (1 - val_fraction))
  return text[:cut], text[cut:]


_FINGERPRINT = ("source", "tfds_name", "train_split", "val_split", "text_feature", "path", "val_fraction")  # fmt: skip


def _fingerprint(data_config) -> dict:
  fp = {k: data_config[k] for k in _FINGERPRINT}
  if data_config.source == "text":  # a changed file must be re-tokenized
    fp["files"] = [(f, *storage.version(f)) for f in storage.glob(data_config.path)]
  return fp


def _tokenize_cached(docs, tokenizer, split, fingerprint, cache_dir, local_cache):
  """Returns (memory-mapped tokens, UTF-8 bytes of text) for a split, tokenizing once.

  A cache_dir on a bucket cannot be memory-mapped: each host keeps a local copy under
  local_cache, named by the key. A host without it downloads the run's files if their key
  matches, else tokenizes them itself; process 0 then uploads them (the .json last, so a
  listed .json always has its tokens)."""
  key = json.loads(json.dumps(_cache_key(tokenizer, fingerprint)))
  if not storage.is_url(cache_dir):
    return _tokenize_local(docs, tokenizer, split, key, cache_dir)
  if storage.is_url(local_cache):
    raise UserError(f"--config.data.cache_dir={local_cache} must be a local directory")
  name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
  local = os.path.join(os.path.expanduser(local_cache), name)
  remote = {f: storage.join(cache_dir, f"{split}{f}") for f in (".bin", ".bin.json")}
  uploaded = _cached_meta(remote[".bin"], key) is not None
  if uploaded and _cached_meta(os.path.join(local, f"{split}.bin"), key) is None:
    os.makedirs(local, exist_ok=True)
    for f in (".bin", ".bin.json"):
      storage.download(remote[f], os.path.join(local, f"{split}{f}"))
  out = _tokenize_local(docs, tokenizer, split, key, local)
  if jax.process_index() == 0 and not uploaded:
    for f in (".bin", ".bin.json"):
      storage.upload(os.path.join(local, f"{split}{f}"), remote[f])
  return out


def _cache_key(tokenizer, fingerprint) -> dict:
  vocab = json.dumps(tokenizer.to_dict(), sort_keys=True).encode()
  return {"source": fingerprint, "tokenizer": hashlib.sha256(vocab).hexdigest()}


def _cached_meta(bin_path: str, key: dict) -> dict | None:
  """The token file's metadata when both files exist and were made for `key`."""
  meta_path = bin_path + ".json"
  if not (storage.exists(meta_path) and storage.exists(bin_path)):
    return None
  meta = json.loads(storage.read_text(meta_path))
  return meta if meta.get("key") == key else None


def _tokenize_local(docs, tokenizer, split, key, cache_dir):
  os.makedirs(cache_dir, exist_ok=True)
  bin_path = os.path.join(cache_dir, f"{split}.bin")
  meta_path = bin_path + ".json"
  dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
  meta = _cached_meta(bin_path, key)
  if meta is None:
    n_bytes, eot = 0, np.array([tokenizer.eot_id], dtype)
    tmp = f"{bin_path}.{uuid.uuid4().hex}.tmp"  # processes sharing a workdir never collide
    try:
      with open(tmp, "wb") as f:  # streamed: constant memory for any corpus
        for chunk in _chunks(docs(), 1024):  # library tokenizers encode a chunk in parallel
          for doc, ids in zip(chunk, tokenizer.encode_batch(chunk)):
            f.write(ids.astype(dtype).tobytes())
            f.write(eot.tobytes())
            n_bytes += len(doc.encode("utf-8"))
      os.replace(tmp, bin_path)
      meta = {"key": key, "bytes": n_bytes}
      with open(tmp, "w") as f:
        json.dump(meta, f)
      os.replace(tmp, meta_path)
    except OSError as e:
      if os.path.exists(tmp):
        os.remove(tmp)
      if e.errno != errno.ENOSPC:
        raise UserError(
          f"cannot write the {split} tokens to {bin_path} ({e.strerror}); pass a writable --workdir"
        ) from None
      free = shutil.disk_usage(cache_dir).free
      raise UserError(
        f"disk full writing the {split} tokens to {bin_path}: it needs up to "
        f"{format_bytes(_most_bytes(docs, np.dtype(dtype).itemsize))} and "
        f"{format_bytes(free)} is free (nothing was kept); free some space or "
        "use a --workdir on a larger disk"
      ) from None
    except BaseException:
      if os.path.exists(tmp):
        os.remove(tmp)
      raise
  if os.path.getsize(bin_path) == 0:
    raise UserError(f"the {split} split is empty; check the data source")
  return np.memmap(bin_path, dtype=dtype, mode="r"), meta["bytes"]


def _most_bytes(docs, itemsize: int) -> int:
  """An upper bound on a split's token file: no tokenizer makes more tokens than UTF-8
  bytes, plus one end-of-text token per document."""
  return sum((len(d.encode("utf-8")) + 1) * itemsize for d in docs())


def _chunks(items, n: int):
  chunk = []
  for item in items:
    chunk.append(item)
    if len(chunk) == n:
      yield chunk
      chunk = []
  if chunk:
    yield chunk


def position(step: int, config, source: dict | None = None) -> dict:
  """Where the data iterator stands (saved in checkpoints): batches are a pure function of
  (seed, step), so the step is the position; the rest tells whether the order still holds,
  and what data it is (`source`: a run never resumes onto other data)."""
  return {
    "next_batch": step,
    "seed": config.seed,
    "batch_size": config.train.batch_size,
    "block_size": config.model.block_size,
    "source": source or task_data.identity(config.data),  # a run passes it, found once
  }


def check_vocabulary(saved: dict | None, tok: tokenizer_lib.Tokenizer, workdir: str, step: int):
  """A checkpoint's ids mean its run's vocabulary: resuming under another (the workdir's
  tokenizer.json deleted or replaced) would train on ids that now mean other text."""
  if saved is not None and saved != tok.to_dict():
    raise UserError(
      f"checkpoint {step} in {workdir} was trained with another vocabulary than "
      f"{tokenizer_file(workdir)} holds now (deleted or replaced?); put the run's file back, "
      "or use a fresh --workdir"
    )


def position_changes(saved: dict, config, workdir: str) -> list[str]:
  """What changed since a saved position that alters the order of batches from here; a
  change of the data itself (source, task files, template) is a UserError."""
  now = position(saved.get("next_batch", 0), config)
  was, asked = saved.get("source", {}), now["source"]
  if diff := ", ".join(  # keys a checkpoint of an older version lacks are not compared
    f"{k} {was[k]!r} -> {asked[k]!r}" for k in asked if k in was and was[k] != asked[k]
  ):
    raise UserError(
      f"{workdir} holds a run trained on other data ({diff}); resuming would mix the two. "
      f"Use a fresh --workdir, with --config.init_from={workdir} to start from its weights"
    )
  return [
    f"{k} {saved[k]} -> {now[k]}"
    for k in ("seed", "batch_size", "block_size")
    if k in saved and saved[k] != now[k]
  ]

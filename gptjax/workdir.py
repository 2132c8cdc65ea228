"""The workdir and other paths a user types: normalised once, locked while a run trains.

Paths from flags are made absolute (and `~` expanded) where the flags are read: orbax
refuses relative paths, and a run must not depend on the directory it was started from.
A training run holds an exclusive lock on its workdir, so a second run there is refused
at once, naming the first. Locally the lock is an flock, which the kernel drops when its
process dies, so a killed run never leaves a stale lock behind. A bucket has no flock: there
the lock is a lease, an object naming its holder that the run rewrites every LEASE_S / 4
seconds; a lease is stale once its holder's process is gone (same host) or it has not been
renewed for LEASE_S (a preempted VM), and a new run takes it over.
"""

import datetime
import fcntl
import hashlib
import json
import os
import re
import socket
import sys
import threading
import time
import uuid

from gptjax import storage
from gptjax.config import leaves
from gptjax.errors import UserError

LOCK = ".gptjax.lock"
LEASE_S = 120.0


def normalize(path: str | None) -> str | None:
  """`~` expanded and absolute (URLs such as gs://bucket/x are left as they are)."""
  if not path:
    return path
  if re.match(r"[a-z0-9]+:/[^/]", path):  # gs:/bucket: a URL with a slash lost
    raise UserError(f"{path!r} looks like a URL missing a '/'; write it as scheme://...")
  return storage.absolute(path)


# Config keys that hold local paths (or globs); init_from's path follows its "hf:".
CONFIG_PATHS = (
  "data.path",
  "data.val_path",
  "data.data_dir",
  "data.manual_dir",
  "data.tokenizer_path",
  "data.cache_dir",
  "compilation_cache_dir",
)


def normalize_config(config) -> None:
  """Every path in `config` made absolute in place (the config may be locked: no new keys)."""
  for key in CONFIG_PATHS:
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    if node[leaf]:
      node[leaf] = normalize(node[leaf])
  if config.init_from and config.init_from.startswith("hf:"):
    config.init_from = "hf:" + normalize(config.init_from[len("hf:") :])
  elif config.init_from:
    config.init_from = normalize(config.init_from)
  template = config.data.chat_template  # a file (not a built-in's name) becomes absolute
  if template and (os.sep in template or os.path.isfile(os.path.expanduser(template))):
    config.data.chat_template = normalize(template)


def run_files(path: str) -> str:
  """Where a gptjax run keeps config.json and tokenizer.json: `path` itself (a workdir or an
  export), else path/export (a workdir whose run was exported and cleaned up)."""
  for d in (path, storage.join(path, "export")):
    if storage.isfile(storage.join(d, "config.json")):
      return d
  raise UserError(
    f"init_from {path!r} is not a gptjax run (no config.json there or in its export/); pass "
    "the --workdir of a trained run or its export, or hf:DIR for a Hugging Face model"
  )


# Flags that name paths, in gptjax.main and the side programs (tokenize's --input is a glob).
PATH_FLAGS = ("workdir", "export_dir", "input", "output", "eval_data", "eval_dir")


def normalize_flags(flag_values) -> None:
  """The path flags and the --config's paths made absolute, once, right after parsing."""
  for name in PATH_FLAGS:
    if name in flag_values and flag_values[name].value:
      flag_values[name].value = normalize(flag_values[name].value)
  if "config" in flag_values and flag_values["config"].value is not None:
    normalize_config(flag_values["config"].value)
  if "workdir" in flag_values and flag_values["workdir"].value:
    path = flag_values["workdir"].value
    if os.path.exists(path) and not os.path.isdir(path):
      raise UserError(
        f"--workdir={path} is a file, not a directory; pass a directory (it is created if missing)"
      )


def Lock(workdir: str):
  """The workdir's lock for the life of a training run: an flock, or a lease on a bucket."""
  return Lease(workdir) if storage.is_url(workdir) else FileLock(workdir)


def _refuse(workdir: str, holder: str):
  raise UserError(
    f"{workdir} is in use by {holder}; wait for that run to end (or stop it), or pass another "
    "--workdir"
  )


def _holder() -> str:
  started = datetime.datetime.now().isoformat(timespec="seconds")
  return f"pid {os.getpid()} on host {socket.gethostname()} (since {started})"


class FileLock:
  """An exclusive flock on WORKDIR/.gptjax.lock (one process takes it)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK)
    self._file = open(self.path, "a+")
    try:
      fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      self._file.seek(0)
      holder = self._file.read().strip() or "another process"
      self._file.close()
      _refuse(workdir, holder)
    self._file.seek(0)
    self._file.truncate()
    self._file.write(_holder())
    self._file.flush()

  def release(self) -> None:
    if not self._file.closed:
      self._file.truncate(0)
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()


class Lease:
  """The lock on a bucket: WORKDIR/.gptjax.lock names its holder and when it last renewed.

  Every write is a compare-and-swap on the object's generation, so of two runs starting
  together one wins, and a run whose lease another took over (it stalled past LEASE_S)
  finds out at its next renewal and stops without writing more (os._exit: the workdir is
  the other run's now)."""

  def __init__(self, workdir: str):
    self.workdir, self.path = workdir, storage.join(workdir, LOCK)
    text, generation = storage.read_versioned(self.path)
    if text and _alive(json.loads(text)):
      _refuse(workdir, json.loads(text)["holder"])
    self._record = {
      "holder": _holder(),
      "host": socket.gethostname(),
      "pid": os.getpid(),
      "token": uuid.uuid4().hex,  # this run's, whatever the host name and pid
    }
    self._generation = storage.write_if(self.path, self._text(), generation)
    if self._generation is None:
      _refuse(workdir, "a run that took its lock at the same moment")
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._keep, daemon=True, name="gptjax-lease")
    self._thread.start()

  def _text(self) -> str:
    return json.dumps({**self._record, "renewed": time.time()})

  def _keep(self) -> None:
    while not self._stop.wait(LEASE_S / 4):
      try:
        generation = storage.write_if(self.path, self._text(), self._generation)
        text, now = storage.read_versioned(self.path) if generation is None else ("", 0)
      except Exception:  # a transient storage error; the next renewal tries again
        continue
      held = json.loads(text) if text else {}
      if generation is None and held.get("token") == self._record["token"]:
        generation = now  # a retried upload whose first attempt had landed: still ours
      if generation is None:
        holder = held.get("holder", "another run")
        print(
          f"gptjax: error: {self.workdir} was taken over by {holder} while this run stalled "
          f"for over {LEASE_S:.0f} s; stopping without saving (that run owns the workdir now)",
          file=sys.stderr,
          flush=True,
        )
        os._exit(1)
      self._generation = generation

  def release(self) -> None:
    if not self._stop.is_set():
      self._stop.set()
      self._thread.join()
      storage.delete_if(self.path, self._generation)


def _alive(held: dict) -> bool:
  """Renewed within LEASE_S, and (on this host) its process still exists: a recreated VM
  with the same host name may run an unrelated process under the old pid."""
  if time.time() - held.get("renewed", 0) >= LEASE_S:
    return False
  if held.get("host") != socket.gethostname():
    return True
  try:
    os.kill(held["pid"], 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    pass
  return True


def check_shared(path: str, wait_s: float = 5.0) -> None:
  """On several processes: UserError on every process unless all of them see one directory.

  Process 0 writes a marker file; the others look for it (for up to wait_s, for network
  file systems' caches). Separate local directories would otherwise hang at the first
  checkpoint, whose finalisation waits for a file only process 0 can see.
  """
  if storage.is_url(path):
    return  # one bucket, seen alike from every host
  import jax  # heavy: the programs' flag parsing imports this module, and needs no JAX
  import numpy as np
  from jax.experimental import multihost_utils

  token = np.frombuffer(uuid.uuid4().bytes, np.uint8)
  if jax.process_index() == 0:
    with open(os.path.join(path, f".gptjax.shared.{token.tobytes().hex()}"), "w") as f:
      f.write(socket.gethostname())
  token = np.asarray(multihost_utils.broadcast_one_to_all(token))  # also a barrier
  marker = os.path.join(path, f".gptjax.shared.{token.astype(np.uint8).tobytes().hex()}")
  deadline = time.monotonic() + wait_s
  while not os.path.exists(marker) and time.monotonic() < deadline:
    time.sleep(0.2)
  seen = multihost_utils.process_allgather(np.array(os.path.exists(marker)))
  if jax.process_index() == 0:
    os.remove(marker)
  blind = [i for i, ok in enumerate(np.asarray(seen).reshape(-1)) if not ok]
  if blind:
    raise UserError(
      f"--workdir={path} is not one shared directory: process(es) "
      f"{', '.join(map(str, blind))} cannot see the files process 0 writes there (a local "
      "directory on each host?); give every process the same shared directory (e.g. on a "
      "network file system)"
    )


# Keys that may differ between the processes of one run: their own id, local caches (TFDS's
# data_dir and manual_dir included: each host prepares its own copy), the coordinator's name.
PER_PROCESS = ("distributed.process_id", "compilation_cache_dir", "data.cache_dir")
PER_PROCESS += ("data.data_dir", "data.manual_dir", "distributed.coordinator_address")


def check_same_config(config) -> None:
  """On several processes: UserError on every process unless all were given one config (but
  for PER_PROCESS). Otherwise each trains its own way while the collectives mix them: a wrong
  run without a word (another learning rate), or an abort at the first unmatched collective."""
  import numpy as np
  from jax.experimental import multihost_utils

  flat = dict(leaves(config))
  keys = sorted(k for k in flat if k not in PER_PROCESS)
  digest = lambda value: np.frombuffer(
    hashlib.sha256(json.dumps(value, sort_keys=True, default=repr).encode()).digest()[:8], np.int32
  )
  whole = np.asarray(multihost_utils.process_allgather(digest([keys, [flat[k] for k in keys]])))
  if (whole == whole[0]).all():
    return
  names = np.asarray(multihost_utils.process_allgather(digest(keys)))
  if not (names == names[0]).all():
    raise UserError(
      "the processes were given different experiments (their configs have other keys); give "
      "every process the same --config"
    )
  each = np.asarray(multihost_utils.process_allgather(np.stack([digest(flat[k]) for k in keys])))
  key = keys[next(i for i in range(len(keys)) if not (each[:, i] == each[0, i]).all())]
  others = [str(p) for p in range(len(each)) if not (each[p] == each[0]).all()]
  raise UserError(
    f"config.{key} differs between the processes (process(es) {', '.join(others)} against "
    "process 0); give every process the same flags but --config.distributed.process_id"
  )

"""Checkpoints with orbax: async saves, keep-N (and the best), exact resume, faults (exports,
params only, are export.py's; a checkpoint's fit to the config is checkpoint_compat.py's).

A checkpoint is WORKDIR/checkpoints/<step>/ with three items:
  params  the parameters (orbax StandardSave: sharded arrays, each host writes its shards)
  train   {step, opt_state, rng}: the rest of the TrainState
  meta    JSON: step, the data position, elapsed time, the config and the tokenizer
Batches are a pure function of (seed, step), so the data position is the step itself; with
the RNG and optimizer state that makes a resumed run identical to one never stopped.

orbax writes a step into a temporary directory and renames it when complete, so a half-written
checkpoint is never listed. A state that is not finite is never saved, and a save that would
not fit on the disk is refused before it starts. A listed checkpoint that fails to restore
(truncated or corrupted files, or non-finite values) is skipped with a warning once an older
one restores (so the fault is in those files, not in the setup); training moves it to
WORKDIR/checkpoints_corrupt/.
"""

import atexit
import contextlib
import errno
import logging
import shutil
import sys

import jax
import orbax.checkpoint as ocp
from absl import logging as absl_logging

from gptjax import checkpoint_compat, storage
from gptjax.errors import UserError, describe
from gptjax.metrics import format_bytes
from gptjax.tree_checks import checksum, is_finite, tree_bytes

CHECKPOINTS, BEST, CORRUPT = "checkpoints", "checkpoints_best", "checkpoints_corrupt"
# On a bucket orbax writes a step in place, then this marker (locally it renames a temporary)
COMMIT_MARKER = "commit_success.txt"


def _manager(directory: str, options) -> ocp.CheckpointManager:
  handlers = {
    "params": ocp.StandardCheckpointHandler(),
    "train": ocp.StandardCheckpointHandler(),
    "meta": ocp.JsonCheckpointHandler(),
  }
  return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def _options(keep: int, async_save: bool, best: bool = False, reader: bool = False):
  # cleanup_tmp_directories: a save cut short (a kill, a full disk) leaves no N.orbax-...-tmp
  # once the run restarts; a reader (sample, export) touches nothing: a save may be in flight.
  kwargs = dict(
    max_to_keep=None if reader else keep,  # a reader sets nothing orbax would warn it drops
    save_interval_steps=0 if reader else 1,
    enable_async_checkpointing=async_save,
    create=not reader,
    cleanup_tmp_directories=not reader,
    read_only=reader,
  )
  if best:
    kwargs.update(best_fn=lambda metrics: metrics["val_loss"], best_mode="min")
  return ocp.CheckpointManagerOptions(**kwargs)


def with_shardings(abstract, shardings):
  """Restore targets: each leaf's shape and dtype, laid out as `shardings` (any mesh)."""
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )


class Checkpoints:
  """The workdir's checkpoints: save (async), restore the newest good one, keep the best."""

  def __init__(self, workdir: str, settings=None, warn=print, reader: bool = False):
    """settings: config.checkpoint (None: keep 3, synchronous saves, no best). reader: reads
    only, while a run may be writing (sample, export): it neither saves nor cleans up."""
    keep = settings.keep if settings is not None else 3
    async_save = settings.async_save if settings is not None else False
    self.workdir, self.warn, self.reader = workdir, warn, reader
    options = _options(keep, async_save, reader=reader)
    self.manager = _manager(storage.join(workdir, CHECKPOINTS), options)
    self.best = None
    if settings is not None and settings.keep_best:
      self.best = _manager(storage.join(workdir, BEST), _options(1, async_save, best=True))
    self._best_loss = None
    self._needed = 0  # bytes the last save needed

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def resume_note(self, what: str = "the same command") -> str:
    """Where rerunning `what` would start, for error messages."""
    steps = self.finished_steps()
    if not steps:
      return f"no checkpoint was saved yet, so rerunning {what} starts from step 0"
    return f"rerunning {what} resumes from checkpoint {steps[-1]}"

  def finished_steps(self) -> list[int]:
    """The steps whose saves completed, read from the directory (not orbax's cached list)."""
    directory = str(self.manager.directory)
    return sorted(int(n) for n in storage.listdir(directory) if n.isdigit() and self._whole(n))

  def _whole(self, name: str) -> bool:
    """Locally a step directory appears whole (orbax renames it into place); on a bucket it
    is whole once orbax has written its commit marker."""
    directory = str(self.manager.directory)
    return not storage.is_url(directory) or storage.exists(
      storage.join(directory, name, COMMIT_MARKER)
    )

  def save(self, state, meta: dict) -> None:
    """Starts saving `state` at its step; returns once the arrays are copied off the devices.

    UserError, before anything is written, when the disk cannot hold it.
    """
    step = int(meta["step"])
    # + per-array metadata and file-system blocks (measured ~3 KiB an array), and the JSON
    self._needed = int(1.05 * tree_bytes(state)) + 4096 * len(jax.tree.leaves(state)) + (64 << 10)
    self._check_space(step)
    with self._disk_errors():
      self.manager.save(step, args=_save_args(state, meta), force=True)

  def _check_space(self, step: int) -> None:
    if self.manager.is_saving_in_progress():  # its bytes are not on the disk yet (rare: a
      self.wait()  # save has `every` steps to finish)
    if storage.is_url(self.manager.directory):
      return  # a bucket has no free-space figure; a refused write is an error at the save
    free = shutil.disk_usage(str(self.manager.directory)).free
    if free < self._needed:
      raise UserError(self._disk_full_message(step))

  def _disk_full_message(self, step: int | None = None) -> str:
    """step None: a save already under way ran out of space (which one orbax does not say)."""
    directory = str(self.manager.directory)
    kept = self.finished_steps()
    intact = (
      f"checkpoint {max(kept)} is intact and rerunning resumes from it"
      if kept
      else "no checkpoint was saved yet"
    )
    what = "a checkpoint" if step is None else f"checkpoint {step}"
    return (
      f"not enough disk space to save {what} in {directory}: it needs "
      f"~{format_bytes(self._needed)} and "
      f"{format_bytes(shutil.disk_usage(directory).free)} is free; free some space (or "
      f"lower --config.checkpoint.keep, or use another --workdir); {intact}"
    )

  @contextlib.contextmanager
  def _disk_errors(self):
    """A write that hit a full disk -> a UserError, with its temporary files removed."""
    try:
      yield
    except Exception as e:
      if not _is_disk_full(e):
        raise
      self._remove_unfinished()
      atexit.register(self._remove_unfinished)  # again once orbax's stragglers are done
      raise UserError(self._disk_full_message()) from None

  def check_for_errors(self) -> None:
    """Raises the error of a background save that failed (a full disk as a UserError)."""
    with self._disk_errors():
      self.manager.check_for_errors()

  def save_best(self, state, meta: dict, val_loss: float) -> None:
    """Also keeps this state in checkpoints_best/ when val_loss is the lowest so far."""
    if self.best is None:
      return
    if self._best_loss is None:  # a resumed run: the best so far is in the kept one's meta
      best_step = self.best.latest_step()
      self._best_loss = (
        float("inf")
        if best_step is None
        else float(
          self.best.restore(best_step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"
          ]["val_loss"]
        )
      )
    if val_loss < self._best_loss:
      self._best_loss = val_loss
      self.best.save(
        int(meta["step"]),
        args=_save_args(state, {**meta, "val_loss": val_loss}),
        force=True,
        metrics={"val_loss": float(val_loss)},
      )

  def restore(self, abstract_state, state_shardings):
    """(state, meta) of the newest checkpoint that restores, onto `state_shardings`; or None.

    Any mesh works: arrays are read and laid out by the target shardings.
    """
    targets = with_shardings(abstract_state, state_shardings)
    train_target = {"step": targets.step, "opt_state": targets.opt_state, "rng": targets.rng}
    args = ocp.args.Composite(
      params=ocp.args.StandardRestore(targets.params),
      train=ocp.args.StandardRestore(train_target),
      meta=ocp.args.JsonRestore(),
    )
    out = self._restore_newest(args, abstract_state.params, train_target)
    if out is None:
      return None
    train = out["train"]
    state = abstract_state.replace(
      step=train["step"], params=out["params"], opt_state=train["opt_state"], rng=train["rng"]
    )
    self._forget_best_after(int(out["meta"]["step"]))
    return state, dict(out["meta"])

  def restore_params(self, abstract_params, shardings, set_aside: bool = True):
    """(params, meta) of the newest checkpoint that restores; params only (for inference)."""
    args = ocp.args.Composite(
      params=ocp.args.StandardRestore(with_shardings(abstract_params, shardings)),
      meta=ocp.args.JsonRestore(),
    )
    out = self._restore_newest(args, abstract_params, None, set_aside)
    return None if out is None else (out["params"], dict(out["meta"]))

  def _restore_newest(self, args, abstract_params, train_target, set_aside: bool = True):
    """Restores the newest step that reads back whole and finite.

    A step that fails is only called bad once an older one restores: then the fault is in
    its files, not in the setup (a wrong path, a missing library), and it is skipped with a
    warning (training also moves it to checkpoints_corrupt/). When no step restores, nothing
    is moved and the error names the newest one's fault. Mismatches with the config and
    out-of-memory are errors at once.
    """
    steps, failed = self.steps(), []
    for step in reversed(steps):
      checkpoint_compat.check(
        self.manager, step, abstract_params, train_target, self.manager.directory
      )
      try:
        out = self.manager.restore(step, args=args)
        if not is_finite(
          out["params"] if train_target is None else (out["params"], out["train"]["opt_state"])
        ):
          raise _Bad("its parameters or optimizer state hold NaN or inf")
        for part, saved in out["meta"].get("checksums", {}).items():  # none: an older version
          if part in out and checksum(out[part]) != saved:
            raise _Bad(f"its {part} differ from what was saved (the checksum): a changed bit")
      except Exception as e:  # truncated, corrupted or unreadable files
        reason = describe(e)
        if "RESOURCE_EXHAUSTED" in reason:
          raise UserError(
            f"out of memory restoring checkpoint {step} ({reason}); restore onto "
            "more devices (--config.mesh.shape)"
          ) from None
        if jax.process_count() > 1:  # hosts could disagree on the fallback
          raise UserError(
            f"checkpoint {step} in {self.manager.directory} cannot be restored "
            f"({reason}); move that step's directory aside and rerun to use "
            "the previous one"
          ) from None
        failed.append((step, reason))
        continue
      for bad, reason in failed:
        self._skip(bad, reason, step, set_aside)
      return out
    if failed:
      step, reason = failed[0]
      raise UserError(
        f"no checkpoint in {self.manager.directory} can be restored (newest, "
        f"{step}: {reason}); nothing was moved: check the path and the "
        "installation, or use a fresh --workdir"
      )
    return None

  def _skip(self, step: int, reason: str, using: int, set_aside: bool) -> None:
    if not set_aside:  # inference only reads: the files stay where they are
      self.warn(
        f"warning: checkpoint {step} in {self.manager.directory} cannot be restored "
        f"({reason}); using checkpoint {using}"
      )
      return
    self._set_aside(step, reason)

  def _set_aside(self, step: int, reason: str) -> None:
    self.warn(
      f"warning: checkpoint {step} in {self.manager.directory} cannot be restored "
      f"({reason}); moved to {CORRUPT}/ and resuming from the previous one"
    )
    dest = storage.join(self.workdir, CORRUPT, str(step))
    storage.rmtree(dest)
    storage.move(storage.join(str(self.manager.directory), str(step)), dest)
    self.manager.reload()  # forget the step it had listed

  def _forget_best_after(self, step: int) -> None:
    """A run resumed at `step` has not reached later best checkpoints (after a fallback)."""
    if self.best is None:
      return
    for later in [s for s in self.best.all_steps() if s > step]:
      self.best.delete(later)

  def wait(self) -> None:
    with self._disk_errors():
      self.manager.wait_until_finished()
      self.manager.check_for_errors()
      if self.best is not None:
        self.best.wait_until_finished()

  def close(self) -> None:
    with self._disk_errors():
      try:
        self.manager.close()
        if self.best is not None:
          self.best.close()
      finally:
        self._remove_unfinished()

  def _remove_unfinished(self) -> None:
    """Temporary directories of saves that failed (nothing is in flight after close)."""
    if jax.process_index() == 0 and not self.reader:
      for tmp in storage.glob(storage.join(self.manager.directory, "*.orbax-checkpoint-tmp*")):
        storage.rmtree(tmp)


class _Bad(Exception):  # a restored step that is not what was saved
  pass


def _is_disk_full(e: BaseException) -> bool:
  while e is not None:
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
      return True
    if "No space left on device" in str(e):
      return True
    e = e.__cause__ or e.__context__
  return False


def _quiet_closed_loops(unraisable) -> None:
  """A failed restore leaves tensorstore reads in flight whose callbacks find orbax's event
  loop closed; those echoes (hundreds of them) say nothing the restore's error has not."""
  text = f"{unraisable.exc_value!r} {unraisable.object!r}"
  if "Event loop is closed" in text or "coroutine" in text:
    return
  _previous_unraisablehook(unraisable)


_previous_unraisablehook = sys.unraisablehook
sys.unraisablehook = _quiet_closed_loops


class _QuietIoEchoes(logging.Filter):
  """A write that hit a full disk, or a restore of unreadable files, fails many of orbax's
  asyncio tasks at once; orbax and asyncio log each with its traceback (and the save's
  metadata thread "No ArrayMetadata", racing the exit). Checkpoints reports the fault in one
  line (orbax re-raises it at check_for_errors and wait), so those echoes are dropped."""

  ECHOES = ("No space left on device", "cannot schedule new futures", "No ArrayMetadata found")
  ECHOES += ("Given directory is read only",)  # a reader's (sample, export): by choice

  def filter(self, record: logging.LogRecord) -> bool:
    text = record.getMessage() + (str(record.exc_info[1]) if record.exc_info else "")
    if any(m in text for m in self.ECHOES):
      return False
    return not (
      record.name == "asyncio" and any(m in text for m in ("orbax", "OCDBT", "tensorstore"))
    )


for _logger in (absl_logging.get_absl_logger(), logging.getLogger("asyncio")):
  _logger.addFilter(_QuietIoEchoes())


def _save_args(state, meta: dict):
  train = {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}
  checksums = {"params": checksum(state.params), "train": checksum(train)}  # read at restore
  return ocp.args.Composite(
    params=ocp.args.StandardSave(state.params),
    train=ocp.args.StandardSave(train),
    meta=ocp.args.JsonSave({**meta, "checksums": checksums}),
  )

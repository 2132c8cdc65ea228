"""The training loop around train.py's compiled steps, in named parts:

  prepare          processes, mesh, data, compiled steps, the memory check, the workdir lock
  restore_or_init  where a run starts: its newest checkpoint, else init_from, else fresh
  Run.loop         the steps; per step: check, log (Timer), evaluate, save
  summarize        summary.json and the closing line

Every side effect of training (files, logs, signals, checkpoints) lives here; the steps
themselves are pure (train.py).
"""

import dataclasses
import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import checkpoint, checkpoint_compat, hf, inference, runtime, sharding, storage
from gptjax import config as config_lib
from gptjax import data as data_lib
from gptjax import metrics as metrics_lib
from gptjax import workdir as workdir_lib
from gptjax.errors import UserError
from gptjax.model import count_params
from gptjax.storage import ensure_writable_dir
from gptjax.train import Setup, TrainState, setup


def say(message: str) -> None:
  """Console output from process 0 only (call after multi-host start-up)."""
  metrics_lib.console(message, enabled=jax.process_index() == 0)


# --- Before the first step -----------------------------------------------------------------


def prepare(
  config, workdir: str, need_data: bool = True, lock: bool = False
) -> tuple[Setup, data_lib.Data | None, "workdir_lib.FileLock | workdir_lib.Lease | None"]:
  """Everything before the first step: processes, mesh, data, compiled steps, memory check.

  need_data=False (compile_only with config.model.vocab_size set) reads no data at all.
  lock=True: process 0 holds the workdir's lock (returned) before writing anything there.
  """
  for change in inference.adopt_init_from(config):  # its shape and vocabulary
    say(f"from init_from {config.init_from}: {change}")
  config_lib.validate(config)
  config_lib.check_trainable(config)
  mesh = runtime.start(config)
  sharding.check_batch(
    config.train.batch_size, config.optim.grad_accum, mesh, sharding.rules(config.mesh)
  )  # before a long data preparation
  ensure_writable_dir(workdir, "--workdir")
  if jax.process_count() > 1:  # one config, one directory: a mix would train wrong or hang
    workdir_lib.check_same_config(config)
    workdir_lib.check_shared(workdir)
  held = workdir_lib.Lock(workdir) if lock and jax.process_index() == 0 else None
  try:
    if inference.is_hf(config.init_from):  # a wrong directory fails before data and compiling
      hf.directory(config.init_from, config.model)
    data = data_lib.load(config, workdir) if need_data else None
    for note in data.notes if data else ():
      say(note)
    say("compiling the train and eval steps")  # minutes for large models: say so first
    s = setup(config, data.tokenizer.vocab_size if data else config.model.vocab_size, mesh)
    for line in s.describe(packed=config.data.source == "task"):
      say(line)
    metrics_lib.check_fits(s.memory(), config)
  except BaseException:
    if held:
      held.release()
    raise
  return s, data, held


def compile_only(config, workdir: str) -> dict:
  """Lowers and compiles the steps for the configured mesh, reports memory, runs nothing."""
  config.model.vocab_size = config.model.vocab_size or config_lib.fixed_vocab_size(config)
  if config.model.vocab_size:
    say(f"compile_only: vocabulary {config.model.vocab_size}; no data is read")
  s, _, _ = prepare(config, workdir, need_data=not config.model.vocab_size)
  say("compile_only: the step fits; nothing was run")
  return {"compile_s": s.compile_s, "mesh": dict(s.mesh.shape), "memory": s.memory()}


@dataclasses.dataclass
class Start:
  """Where a run starts: the state, its step, the training time before it."""

  state: TrainState
  step: int
  elapsed_s: float
  resumed: bool
  eval_owed: bool = False  # a signal cut the saved step's eval short: it runs first


def restore_or_init(config, workdir: str, s: Setup, ckpt: checkpoint.Checkpoints, tok) -> Start:
  """The one place that decides where a run starts: the newest checkpoint that restores,
  else the init_from weights with a fresh optimizer, else a fresh init."""
  restored = ckpt.restore(s.abstract, s.state_shardings)
  if restored is not None:
    state, meta = restored
    step, elapsed, owed = int(meta["step"]), meta.get("elapsed_s", 0.0), meta.get("eval_owed")
    data_lib.check_vocabulary(meta.get("tokenizer"), tok, workdir, step)
    start = Start(state, step, float(elapsed), True, bool(owed))
    for change in data_lib.position_changes(meta.get("data", {}), config, workdir):
      say(
        f"warning: {change} since the checkpoint: the data order from here differs from "
        "the run that saved it"
      )
    now = config_lib.resolved(config, s.model.cfg.vocab_size)
    for change in checkpoint_compat.training_changes(meta.get("config", {}), now):
      say(f"warning: resuming with {change}; config.json records the new value")
    say(f"resumed from checkpoint {start.step} in {ckpt.manager.directory}")
    return start
  if jax.process_index() == 0 and (aside := metrics_lib.set_aside(workdir)):
    say(f"warning: {workdir} holds metrics but no checkpoint: training starts at step 0 ({aside})")
  state = s.init(config.seed)
  if config.init_from:  # imported weights, a fresh optimizer (Adam starts at zero anyway)
    params, where = inference.init_from(config.init_from, s.model.cfg)
    state = state.replace(params=jax.device_put(params, s.state_shardings.params))
    say(f"initialised the parameters from {where}")
  return Start(state, 0, 0.0, False)


# --- The loop ------------------------------------------------------------------------------


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains `config` in workdir, resuming from its newest checkpoint; returns the summary.

  Saves every config.checkpoint.every steps, at the end, and on SIGTERM/SIGINT (then returns
  with summary["preempted_at"] set). A non-finite loss stops the run before any save.
  """
  # Other data: refused before it is read and the steps compiled (minutes)
  if (saved := _newest_saved(workdir)) is not None:
    data_lib.position_changes(saved.get("data", {}), config, workdir)
  with runtime.interrupt_kills():  # Ctrl-C while compiling: no state yet, stop at once
    s, data, lock = prepare(config, workdir, lock=True)
  previous_hint = runtime.resume_hint  # what a lost peer's message says; restored below
  try:
    ckpt = checkpoint.Checkpoints(workdir, config.checkpoint, warn=say)
    runtime.resume_hint = lambda: ckpt.resume_note("the same command on every process")
    start = restore_or_init(config, workdir, s, ckpt, data.tokenizer)
    resolved = config_lib.resolved(config, s.model.cfg.vocab_size)
    # At the last step without its summary, a signal cut the last eval short or a kill came
    # first: that eval, then the summary. Else a finished run: before config.json is written.
    summary = metrics_lib.read_summary(workdir, start.step)
    owed = start.step == config.train.num_steps and summary is None
    if start.step >= config.train.num_steps and not owed:
      ckpt.close()
      return _nothing_to_do(config, workdir, start.step, summary)
    start.eval_owed |= owed
    if jax.process_index() == 0:
      storage.write_text(
        storage.join(workdir, "config.json"), json.dumps(resolved, indent=2, sort_keys=True)
      )
    return Run(config, workdir, s, data, ckpt, start, resolved).loop()
  except Exception as e:
    runtime.exit_if_peer_lost(e)
    raise
  finally:
    runtime.resume_hint = previous_hint
    if lock:
      lock.release()


def _newest_saved(workdir: str) -> dict | None:
  """The newest whole checkpoint's meta, read as plain JSON (no JAX, no orbax); None when
  there is none or it does not read: restore_or_init decides then, as for every run."""
  directory = storage.join(workdir, checkpoint.CHECKPOINTS)
  try:
    step = max((int(n) for n in storage.listdir(directory) if n.isdigit()), default=None)
    whole = storage.join(directory, str(step), checkpoint.COMMIT_MARKER)
    if step is None or (storage.is_url(directory) and not storage.exists(whole)):
      return None
    return storage.read_json(storage.join(directory, str(step), "meta", "metadata"))
  except Exception:  # a pre-check only: the restore reports what is wrong
    return None


def _nothing_to_do(config, workdir: str, step: int, summary: dict | None) -> dict:
  """Exit 0: a restart loop re-running a finished job must stop."""
  say(
    f"nothing to do: {workdir} is already trained to step {step} (train.num_steps="
    f"{config.train.num_steps}); to train on, raise --config.train.num_steps (and set "
    "--config.optim.decay_steps to keep the old learning-rate schedule)"
  )
  return summary or {"steps": step}


class Run:
  """One training run from its start to its last step (or a preemption)."""

  def __init__(self, config, workdir, s: Setup, data, ckpt, start: Start, resolved: dict):
    self.config, self.workdir, self.s, self.data, self.ckpt = config, workdir, s, data, ckpt
    self.state, self.first, self.eval_owed = start.state, start.step, start.eval_owed
    self.lead = jax.process_index() == 0
    self.rows = s.rows()  # each process loads only the rows its devices hold
    self.writer = metrics_lib.MetricWriter(
      workdir,
      enabled=self.lead,
      resume_step=start.step,  # later lines: replaced
    )
    self.timer = metrics_lib.Timer(start.step, start.elapsed_s)
    self.run_meta = {"config": resolved, "tokenizer": data.tokenizer.to_dict()}
    self.tokens_per_step = config.train.batch_size * s.model.cfg.block_size
    self.step_ms, self.val_losses, self.last_log = [], [], {}
    self.in_flight = runtime.InFlight()  # how far the host may run ahead of the device
    # the data's identity, found once: a template file edited or moved mid-run cannot matter
    self.source = data_lib.position(0, config)["source"]

  def loop(self) -> dict:
    num_steps, preempted, step = self.config.train.num_steps, None, self.first
    stop = runtime.PreemptionWatch()
    try:
      with self.timer.pause():  # an owed eval is no training time either
        if self.eval_owed and not self._evaluate(step, self._meta(step), stop):
          preempted = stop.received  # signalled again: the checkpoint still owes the eval
      for step in range(self.first + 1, num_steps + 1 if not preempted else 0):
        preempted = self._step(step, stop)
        if preempted:
          say(
            f"{preempted} received: saved checkpoint {step} and stopped; run the same "
            "command to resume"
          )
          break
    except Exception as e:
      runtime.exit_if_peer_lost(e)  # now, not after the finally's wait on a barrier with the dead
      raise
    finally:
      stop.close()
      try:
        self.ckpt.wait()  # a checkpoint being written completes, even when the loop failed
      finally:
        self.ckpt.close()
        self.writer.close()
    return summarize(self, preempted and step)

  def _step(self, step: int, stop: runtime.PreemptionWatch) -> str | None:
    """One train step and what falls on it; returns the signal's name if the run stops."""
    train_config, every = self.config.train, self.config.checkpoint.every
    self.state, metrics = self.s.train_step(
      self.state, self.s.batch(self.data.train.get(step - 1, self.rows))
    )
    self.in_flight.add(metrics["loss"])  # a signal waits a step or three, not log_every
    if step == self.first + 1 and self.lead:  # the vocabulary of a run that trained
      data_lib.save_run_files(self.data.tokenizer, self.config, self.workdir)
    last = step == train_config.num_steps
    preempted = None if last else stop.reached(step)  # the end saves anyway
    save = (every and step % every == 0) or last or preempted
    log = step % train_config.log_every == 0 or last
    if log or save:
      metrics = jax.device_get(metrics)  # the only host syncs on the training path
      self._check(step, metrics)
    now = time.perf_counter()
    if log:
      self._log(step, metrics, now)
    evaluating = step % train_config.eval_every == 0 or last
    if not (save or evaluating):
      return preempted
    jax.block_until_ready(self.state.params)  # pending train steps count as training time
    with self.timer.pause():  # evals and checkpoint copies do not count as training time
      meta = self._meta(step, now)
      if evaluating and not self._evaluate(step, meta, stop):
        preempted, save = stop.received, True  # a signal during the eval: save now
        meta["eval_owed"] = True  # the resumed run evaluates this step first
      if save:
        self.writer.flush()  # on a bucket: every line up to this checkpoint is uploaded
        self.ckpt.save(self.state, meta)
    return preempted

  def _meta(self, step: int, now: float | None = None) -> dict:
    """What a checkpoint of this step records besides the state."""
    data = data_lib.position(step, self.config, self.source)
    return {"step": step, "elapsed_s": self.timer.elapsed_s(now), "data": data, **self.run_meta}

  def _check(self, step: int, metrics: dict) -> None:
    """Stop before any save of a non-finite state; surface a failed background save."""
    if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
      raise UserError(
        f"loss became {metrics['loss']} (grad norm {metrics['grad_norm']}) at step {step}; nothing from "
        f"this state was saved. Lower --config.optim.lr or check the data; "
        f"{self.ckpt.resume_note()}"
      )
    if not metrics["finite"]:
      raise UserError(
        f"the parameters or optimizer state became NaN or inf at step {step} (loss "
        f"{metrics['loss']:.4f} before the update); nothing from this state was saved. Lower "
        f"--config.optim.lr (or raise --config.optim.eps); {self.ckpt.resume_note()}"
      )
    self.ckpt.check_for_errors()  # a background save that failed surfaces now, not a save late

  def _log(self, step: int, metrics: dict, now: float) -> None:
    ms = self.timer.lap_ms(step, now)
    self.step_ms.append(ms)
    cfg, tokens_per_s = self.s.model.cfg, self.tokens_per_step / ms * 1e3
    speed = metrics_lib.throughput(
      tokens_per_s, cfg, jax.device_count(), jax.devices()[0].device_kind
    )
    self.last_log = {
      "loss": float(metrics["loss"]),
      "lr": float(metrics["lr"]),
      "grad_norm": float(metrics["grad_norm"]),
      "tokens_per_sec": tokens_per_s,
      "step_ms": ms,
      "tflops_per_device": speed["tflops_per_device"],
      **({"mfu": speed["mfu"]} if speed["mfu"] is not None else {}),
      "elapsed_s": self.timer.elapsed_s(now),
    }
    if "trained_tokens" in metrics:  # task data: the step's loss-weighted tokens
      self.last_log["trained_tokens"] = float(metrics["trained_tokens"])
    self.writer.write(step, self.last_log)
    num_steps = self.config.train.num_steps
    eta = (num_steps - step) * float(np.median(self.step_ms)) / 1e3
    say(
      metrics_lib.progress_line(
        step, num_steps, self.last_log["loss"], tokens_per_s, eta, self.last_log["lr"], speed["mfu"]
      )
    )
    if len(self.step_ms) == 1 and eta > 4 * 3600 and jax.default_backend() == "cpu":
      say(metrics_lib.slow_run_note(eta))

  def _evaluate(self, step: int, meta: dict, stop: runtime.PreemptionWatch) -> bool:
    """Validation loss, logged, and the best checkpoint kept; False if a signal cut it short."""
    train_config = self.config.train
    val_at = lambda i: self.s.batch(self.data.val.get(i, self.rows))
    n = train_config.eval_batches
    n = min(n, self.data.val.num_batches) if hasattr(self.data.val, "num_batches") else n
    val_loss = evaluate(self.s.eval_step, self.state.params, val_at, n, stop.pending)
    if val_loss is None:
      return False
    bpb = val_loss / math.log(2) / self.data.val_bytes_per_token
    self.val_losses.append(val_loss)
    scalars = {"val_loss": val_loss, "val_bpb": bpb, "elapsed_s": self.timer.elapsed_s()}
    self.writer.write(step, scalars)
    say(f"eval step {step} | val_loss {val_loss:.4f} | val bits/byte {bpb:.4f}")
    self.ckpt.save_best(self.state, meta, val_loss)
    return True


def evaluate(eval_fn, params, batch_at, num_batches: int, stop=lambda: False) -> float | None:
  """Mean loss over the first num_batches validation batches (the same ones every time).

  batch_at(i) gives batch i; on several hosts every process calls this with its share.
  None when stop() turns true first (a preemption notice leaves ~30 s to save).
  """
  losses = []
  for i in range(num_batches):
    if stop():
      return None
    losses.append(eval_fn(params, batch_at(i)))
    if i:  # at most two batches in flight: stop() is seen within a batch or two
      losses[-2].block_until_ready()
  losses = jnp.stack(losses)
  if losses.ndim == 2:  # task batches: (weighted loss sum, weight) each
    return float(jnp.sum(losses[:, 0]) / jnp.maximum(jnp.sum(losses[:, 1]), 1.0))
  return float(jnp.mean(losses))


# --- After the last step -------------------------------------------------------------------


def summarize(run: Run, preempted_at) -> dict:
  """The run's summary; written to summary.json (and said) when the run completed."""
  s, train_config, step_ms, val_losses = run.s, run.config.train, run.step_ms, run.val_losses
  wall_s = time.perf_counter() - run.timer.start
  median = float(np.median(step_ms)) if step_ms else None
  tokens_per_s = run.tokens_per_step / median * 1e3 if median else None
  device_kind, devices = jax.devices()[0].device_kind, jax.device_count()
  speed = metrics_lib.throughput(tokens_per_s or 0.0, s.model.cfg, devices, device_kind)
  summary = {
    "steps": train_config.num_steps,
    "n_params": count_params(s.abstract.params),
    "mesh": dict(s.mesh.shape),
    "memory": s.memory(),
    "compile_s": s.compile_s,
    "wall_s": wall_s,
    "median_step_ms": median,
    "tokens_per_sec": tokens_per_s,
    "mfu": speed["mfu"] if median else None,
    "final_loss": run.last_log.get("loss"),
    "final_val_loss": val_losses[-1] if val_losses else None,
    "best_val_loss": min(val_losses) if val_losses else None,
    "preempted_at": preempted_at or None,
  }
  if preempted_at:
    return summary
  if jax.process_index() == 0:
    storage.write_text(storage.join(run.workdir, "summary.json"), json.dumps(summary, indent=2))
  rate = f", median {median:.2f} ms/step, {tokens_per_s / 1e3:.1f}k tok/s" if median else ""
  val = f", final val_loss {summary['final_val_loss']:.4f}" if val_losses else ""
  wall = f"{metrics_lib.format_duration(wall_s)} (+{s.compile_s:.1f}s compile)"
  say(f"done: {train_config.num_steps} steps; this run {wall}{rate}{val}")
  return summary

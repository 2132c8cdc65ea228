"""Training: an explicit TrainState pytree, pure jitted steps, and the loop around them.

`train_step` and `eval_step` are pure functions of their inputs; everything with side
effects (data loading, logging, files) stays in `train_and_evaluate`.
"""

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gptjax import checkpoint, optim, runtime, sharding
from gptjax import config as config_lib
from gptjax import data as data_lib
from gptjax import metrics as metrics_lib
from gptjax import workdir as workdir_lib
from gptjax.attention import resolve_implementation
from gptjax.errors import UserError, describe, ensure_writable_dir
from gptjax.loss import cross_entropy, fused_cross_entropy
from gptjax.model import GPT, GPTConfig, count_params, stack_layers


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: updates applied so far
  params: Any
  opt_state: Any
  rng: jax.Array  # base dropout key; step keys are fold_in(rng, step)


def _boxed_init(model: GPT, tx: optax.GradientTransformation, rng) -> TrainState:
  """The initial state with params (and Adam's moments) still boxed in their logical names."""
  init_rng, dropout_rng = jax.random.split(rng)
  tokens_1xT = jnp.zeros((1, model.cfg.block_size), jnp.int32)
  if model.cfg.scan_layers:  # the loop's initial values, stacked: scanning changes how the
    # step compiles, never where a run starts
    loop = GPT(dataclasses.replace(model.cfg, scan_layers=False))
    params = stack_layers(loop.init(init_rng, tokens_1xT)["params"], model.cfg.n_layer)
  else:
    params = model.init(init_rng, tokens_1xT)["params"]
  return TrainState(
    step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=dropout_rng
  )


def abstract_state(model: GPT, tx: optax.GradientTransformation, seed: int) -> TrainState:
  """Shapes, dtypes and logical names of the state, without allocating it (jax.eval_shape)."""
  return jax.eval_shape(functools.partial(_boxed_init, model, tx), jax.random.PRNGKey(seed))


def init_state(
  model: GPT, tx: optax.GradientTransformation, seed: int, shardings=None
) -> TrainState:
  """Initialises params (float32 by default) and optimizer state, jitted.

  With `shardings` every device creates only its own shard: no host ever holds the whole
  model. The values do not depend on the sharding (JAX's partitionable threefry).
  """
  init = lambda rng: nn.meta.unbox(_boxed_init(model, tx, rng))  # noqa: E731
  return jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(seed))


def _loss(
  params,
  model: GPT,
  batch_BxT1,
  rng,
  deterministic: bool,
  label_smoothing: float,
  loss_chunk: int = 0,
):
  """Mean next-token loss; loss_chunk > 0 applies the LM head and the loss that many
  positions at a time (loss.fused_cross_entropy) instead of materialising all logits."""
  inputs_BxT, targets_BxT = batch_BxT1[:, :-1], batch_BxT1[:, 1:]
  out = model.apply(
    {"params": params},
    inputs_BxT,
    deterministic=deterministic,
    rngs=None if deterministic else {"dropout": rng},
    return_hidden=bool(loss_chunk),
  )
  if loss_chunk:
    x_BxTxD, w_VxD = out
    return fused_cross_entropy(x_BxTxD, w_VxD, targets_BxT, model.cfg, loss_chunk, label_smoothing)
  return cross_entropy(out, targets_BxT, model.cfg.vocab_size, label_smoothing).mean()


def train_step(
  state: TrainState,
  batch_BxT1,
  *,
  model: GPT,
  tx,
  lr_schedule,
  grad_accum: int = 1,
  label_smoothing: float = 0.0,
  loss_chunk: int = 0,
):
  """One optimizer update over a (B, T+1) batch -> (new state, metrics).

  With grad_accum > 1 the batch is split into microbatches whose gradients a lax.scan
  averages, so memory scales with B / grad_accum while the update sees all of B.
  """
  rng = jax.random.fold_in(state.rng, state.step)
  grad_fn = jax.value_and_grad(_loss)
  deterministic = model.cfg.dropout == 0 and model.cfg.attn_dropout == 0
  if grad_accum == 1:
    loss, grads = grad_fn(
      state.params, model, batch_BxT1, rng, deterministic, label_smoothing, loss_chunk
    )
  else:
    # Microbatch i takes rows i, i+A, i+2A, ...: each device's rows split evenly among the
    # microbatches, so every microbatch stays spread over all data-parallel devices.
    micro_AxbxT1 = batch_BxT1.reshape(-1, grad_accum, batch_BxT1.shape[-1]).swapaxes(0, 1)
    micro_AxbxT1 = nn.with_logical_constraint(micro_AxbxT1, (None, "batch", None))

    def accumulate(carry, i_and_micro):
      i, micro_bxT1 = i_and_micro
      loss_i, grads_i = grad_fn(
        state.params,
        model,
        micro_bxT1,
        jax.random.fold_in(rng, i),
        deterministic,
        label_smoothing,
        loss_chunk,
      )
      return jax.tree.map(jnp.add, carry, (loss_i, grads_i)), None

    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
    (loss, grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(grad_accum), micro_AxbxT1))
    loss, grads = jax.tree.map(lambda x: x / grad_accum, (loss, grads))
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {
    "loss": loss,
    "grad_norm": optax.tree_utils.tree_norm(grads),
    "lr": lr_schedule(state.step),
    # what a checkpoint of the new state would hold: never save NaN or inf
    "finite": checkpoint.all_finite((params, opt_state)),
  }
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch_BxT1, *, model: GPT, loss_chunk: int = 0):
  """Mean next-token loss (nats) of a (B, T+1) batch, dropout off."""
  return _loss(params, model, batch_BxT1, None, True, 0.0, loss_chunk)


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
  return float(jnp.mean(jnp.stack(losses)))


@dataclasses.dataclass
class Setup:
  """A model laid out on a mesh: its shardings and compiled steps (no data, no files)."""

  model: GPT
  tx: optax.GradientTransformation
  mesh: jax.sharding.Mesh
  abstract: TrainState  # shapes and dtypes of the state
  state_shardings: TrainState  # a NamedSharding per leaf
  batch_sharding: jax.sharding.NamedSharding
  batch_shape: tuple  # (global batch, block_size + 1)
  train_step: Any  # compiled: (state, batch) -> (state, metrics); donates the state
  eval_step: Any  # compiled: (params, batch) -> mean loss
  compile_s: float

  def init(self, seed: int) -> TrainState:
    return init_state(self.model, self.tx, seed, self.state_shardings)

  def rows(self) -> slice:
    """The rows of each global batch that this process loads."""
    return sharding.process_rows(self.batch_sharding, self.batch_shape)

  def batch(self, local_rows: np.ndarray) -> jax.Array:
    """This process's rows (an int32 array) -> the global, sharded batch."""
    return sharding.global_batch(local_rows, self.batch_sharding, self.batch_shape)

  def memory(self) -> dict:
    return metrics_lib.memory_report(self.abstract, self.state_shardings, self.train_step)


def setup(config, vocab_size: int, mesh: jax.sharding.Mesh, compile: bool = True) -> Setup:
  """Checks that the config fits the mesh, derives every sharding and compiles both steps.

  Shardings come from the abstract state's logical names and config.mesh.rules; the steps
  are jitted with explicit in/out shardings and compiled ahead of time (compile=False: the
  layout only, steps None).
  """
  tc, rules = config.train, sharding.rules(config.mesh)
  sharding.check_batch(tc.batch_size, config.optim.grad_accum, mesh, rules)
  model = GPT(GPTConfig.from_config(config.model, vocab_size))
  resolve_implementation(model.cfg.attention, model.cfg.dtype)  # fail before compiling
  lr_schedule = optim.schedule(config.optim, tc.num_steps)
  tx = optim.make(config.optim, tc.num_steps)
  boxed = abstract_state(model, tx, config.seed)
  sharding.check_divisible(boxed.params, mesh, rules)
  state_sh = sharding.tree_shardings(boxed, mesh, rules)
  abstract = nn.meta.unbox(boxed)
  batch_sh = sharding.batch_sharding(mesh, rules)
  shape = (tc.batch_size, model.cfg.block_size + 1)
  batch_spec = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  loss_chunk = tc.get("loss_chunk", 0)  # runs saved before it existed
  t0 = time.perf_counter()
  if not compile:
    return Setup(model, tx, mesh, abstract, state_sh, batch_sh, shape, None, None, 0.0)
  with sharding.context(mesh, rules):
    step_fn = (
      jax.jit(
        functools.partial(
          train_step,
          model=model,
          tx=tx,
          lr_schedule=lr_schedule,
          grad_accum=config.optim.grad_accum,
          label_smoothing=tc.label_smoothing,
          loss_chunk=loss_chunk,
        ),
        in_shardings=(state_sh, batch_sh),
        out_shardings=(state_sh, replicated),
        donate_argnums=0,
      )
      .lower(abstract, batch_spec)
      .compile()
    )
    eval_fn = (
      jax.jit(
        functools.partial(eval_step, model=model, loss_chunk=loss_chunk),
        in_shardings=(state_sh.params, batch_sh),
        out_shardings=replicated,
      )
      .lower(abstract.params, batch_spec)
      .compile()
    )
  return Setup(
    model, tx, mesh, abstract, state_sh, batch_sh, shape, step_fn, eval_fn, time.perf_counter() - t0
  )


def say(message: str) -> None:
  """Console output from process 0 only (call after multi-host start-up)."""
  metrics_lib.console(message, enabled=jax.process_index() == 0)


def prepare(
  config, workdir: str, need_data: bool = True, lock: bool = False
) -> tuple[Setup, data_lib.Data | None, workdir_lib.Lock | None]:
  """Everything before the first step: processes, mesh, data, compiled steps, memory check.

  need_data=False (compile_only with config.model.vocab_size set) reads no data at all.
  lock=True: process 0 holds the workdir's lock (returned) before writing anything there.
  """
  config_lib.validate(config)
  mesh = runtime.start(config)
  sharding.check_batch(
    config.train.batch_size, config.optim.grad_accum, mesh, sharding.rules(config.mesh)
  )  # before a long data preparation
  ensure_writable_dir(workdir, "--workdir")
  if jax.process_count() > 1:
    workdir_lib.check_shared(workdir)
  held = workdir_lib.Lock(workdir) if lock and jax.process_index() == 0 else None
  try:
    s, data = _prepare_model(config, workdir, mesh, need_data)
  except BaseException:
    if held:
      held.release()
    raise
  return s, data, held


def _prepare_model(config, workdir: str, mesh, need_data: bool):
  if config.init_from:  # a wrong directory fails before data preparation and compiling
    from gptjax import hf

    hf.directory(config.init_from, config.model)
  data = data_lib.load(config, workdir) if need_data else None
  s = setup(config, data.tokenizer.vocab_size if data else config.model.vocab_size, mesh)
  cfg = s.model.cfg
  n_params = count_params(s.abstract.params)
  say(
    f"model: {n_params / 1e6:.2f}M parameters ("
    f"{count_params(s.abstract.params, True) / 1e6:.2f}M without embeddings), vocab "
    f"{cfg.vocab_size} padded to {cfg.padded_vocab}, {jnp.dtype(cfg.dtype).name} compute, "
    f"attention {resolve_implementation(cfg.attention, cfg.dtype)}"
  )
  say(f"compiled train and eval steps in {s.compile_s:.1f}s")
  mem, fmt = s.memory(), metrics_lib.format_bytes
  say(
    f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.default_backend()} device(s), "
    f"{jax.process_count()} process(es); per device: params {fmt(mem['params'])}, optimizer "
    f"state {fmt(mem['opt_state'])}"
    + (
      f", step temporaries {fmt(mem['temp'])}, peak ~{fmt(mem['peak_estimate'])}"
      if "temp" in mem
      else ""
    )
  )
  metrics_lib.check_fits(mem)
  return s, data


def compile_only(config, workdir: str) -> dict:
  """Lowers and compiles the steps for the configured mesh, reports memory, runs nothing."""
  if config.model.vocab_size:
    say(
      f"compile_only: vocabulary {config.model.vocab_size} from config.model.vocab_size; "
      "no data is read"
    )
  s, _, _ = prepare(config, workdir, need_data=not config.model.vocab_size)
  say("compile_only: the step fits; nothing was run")
  return {"compile_s": s.compile_s, "mesh": dict(s.mesh.shape), "memory": s.memory()}


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains `config` in workdir, resuming from its newest checkpoint; returns the summary.

  Saves every config.checkpoint.every steps, at the end, and on SIGTERM/SIGINT (then returns
  with summary["preempted_at"] set). A non-finite loss stops the run before any save.
  """
  s, data, lock = prepare(config, workdir, lock=True)
  try:
    return _train(config, workdir, s, data)
  except Exception as e:
    _exit_if_peer_lost(e)
    raise
  finally:
    if lock:
      lock.release()


def _train(config, workdir: str, s: Setup, data: data_lib.Data) -> dict:
  tc, cfg = config.train, s.model.cfg
  lead = jax.process_index() == 0
  ckpt = checkpoint.Checkpoints(workdir, config.checkpoint, warn=say)
  runtime.resume_hint = lambda: _resume_note(ckpt, "the same command on every process")
  restored = ckpt.restore(s.abstract, s.state_shardings)
  if restored is None:
    if os.path.exists(os.path.join(workdir, "metrics.jsonl")):
      say(
        f"warning: {workdir} holds metrics but no checkpoint; training starts at step 0 and "
        "appends to metrics.jsonl (use a fresh --workdir to keep runs apart)"
      )
    state, start, elapsed0 = s.init(config.seed), 0, 0.0
    if config.init_from:  # imported weights, a fresh optimizer (Adam starts at zero anyway)
      from gptjax import hf

      params = hf.load_params(config.init_from, cfg)
      state = state.replace(params=jax.device_put(params, s.state_shardings.params))
      say(f"initialised the parameters from {config.init_from}")
  else:
    state, meta = restored
    start, elapsed0 = int(meta["step"]), float(meta.get("elapsed_s", 0.0))
    for change in data_lib.position_changes(meta.get("data", {}), config):
      say(
        f"warning: {change} since the checkpoint: the data order from here differs from "
        "the run that saved it"
      )
    say(f"resumed from checkpoint {start} in {ckpt.manager.directory}")
  resolved = config_lib.resolved(config, cfg.vocab_size)
  if lead:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(resolved, f, indent=2, sort_keys=True)
  if start >= tc.num_steps:  # exit 0: a restart loop re-running a finished job must stop
    ckpt.close()
    say(
      f"nothing to do: {workdir} is already trained to step {start} (train.num_steps="
      f"{tc.num_steps}); to train on, raise --config.train.num_steps (and set "
      "--config.optim.decay_steps to keep the old learning-rate schedule)"
    )
    path = os.path.join(workdir, "summary.json")
    return json.load(open(path)) if os.path.exists(path) else {"steps": start}
  run_meta = {"config": resolved, "tokenizer": data.tokenizer.to_dict()}
  rows = s.rows()  # each process loads only the rows its devices hold
  train_at = lambda i: s.batch(data.train.get(i, rows))  # noqa: E731
  val_at = lambda i: s.batch(data.val.get(i, rows))  # noqa: E731
  writer = metrics_lib.MetricWriter(workdir, enabled=lead, resume_step=start if restored else None)
  stop = runtime.PreemptionWatch()

  tokens_per_step = tc.batch_size * cfg.block_size
  device_kind = jax.devices()[0].device_kind
  every = config.checkpoint.every
  step_ms, val_losses, last_log, preempted = [], [], {}, None
  t_start = t_mark = time.perf_counter()
  mark_step, eval_s = start, 0.0
  try:
    for step in range(start + 1, tc.num_steps + 1):
      state, m = s.train_step(state, train_at(step - 1))
      if step == start + 1 and lead:  # the vocabulary of a run that trained (idempotent)
        data_lib.save_tokenizer(data.tokenizer, workdir)
      preempted = stop.reached(step) if step < tc.num_steps else None  # the end saves anyway
      save = (every and step % every == 0) or step == tc.num_steps or preempted
      log = step % tc.log_every == 0 or step == tc.num_steps
      if log or save:
        m = jax.device_get(m)  # the only host syncs on the training path
        if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
          raise UserError(
            f"loss became {m['loss']} (grad norm {m['grad_norm']}) at step "
            f"{step}; nothing from this state was saved. Lower "
            f"--config.optim.lr or check the data; {_resume_note(ckpt)}"
          )
        if not m["finite"]:
          raise UserError(
            f"the parameters or optimizer state became NaN or inf at step "
            f"{step} (loss {m['loss']:.4f} before the update); nothing from "
            "this state was saved. Lower --config.optim.lr (or raise "
            f"--config.optim.eps); {_resume_note(ckpt)}"
          )
        ckpt.check_for_errors()  # a background save that failed surfaces now, not a save late
      now = time.perf_counter()
      if log:
        ms = (now - t_mark - eval_s) * 1e3 / (step - mark_step)
        step_ms.append(ms)
        speed = metrics_lib.throughput(
          tokens_per_step / ms * 1e3, cfg, jax.device_count(), device_kind
        )
        last_log = {
          "loss": float(m["loss"]),
          "lr": float(m["lr"]),
          "grad_norm": float(m["grad_norm"]),
          "tokens_per_sec": tokens_per_step / ms * 1e3,
          "step_ms": ms,
          "tflops_per_device": speed["tflops_per_device"],
          **({"mfu": speed["mfu"]} if speed["mfu"] is not None else {}),
          "elapsed_s": elapsed0 + now - t_start,
        }
        writer.write(step, last_log)
        eta = (tc.num_steps - step) * float(np.median(step_ms)) / 1e3
        say(
          metrics_lib.progress_line(
            step,
            tc.num_steps,
            last_log["loss"],
            last_log["tokens_per_sec"],
            eta,
            last_log["lr"],
            speed["mfu"],
          )
        )
        t_mark, mark_step, eval_s = now, step, 0.0
      if save:
        jax.block_until_ready(state.params)  # pending train steps count as training time
      t_pause = time.perf_counter()  # evals and checkpoint copies do not count as train time
      meta = {
        "step": step,
        "elapsed_s": elapsed0 + now - t_start,
        "data": data_lib.position(step, config),
        **run_meta,
      }
      if step % tc.eval_every == 0 or step == tc.num_steps:
        jax.block_until_ready(state.params)  # pending train steps count as training time
        t_pause = time.perf_counter()
        val_loss = evaluate(s.eval_step, state.params, val_at, tc.eval_batches, stop.pending)
        if val_loss is None:  # a signal during the eval: save now, evaluate after resuming
          preempted, save = stop.received, True
        else:
          bpb = val_loss / math.log(2) / data.val_bytes_per_token
          val_losses.append(val_loss)
          writer.write(
            step,
            {
              "val_loss": val_loss,
              "val_bpb": bpb,
              "elapsed_s": elapsed0 + time.perf_counter() - t_start,
            },
          )
          say(f"eval step {step} | val_loss {val_loss:.4f} | val bits/byte {bpb:.4f}")
          ckpt.save_best(state, meta, val_loss)
      if save:
        ckpt.save(state, meta)
      eval_s += time.perf_counter() - t_pause
      if preempted:
        say(
          f"{preempted} received: saved checkpoint {step} and stopped; run the same command "
          "to resume"
        )
        break
  except Exception as e:
    _exit_if_peer_lost(e)  # now, not after the finally's wait on a barrier with the dead
    raise
  finally:
    stop.close()
    try:
      ckpt.wait()  # a checkpoint being written completes, even when the loop failed
    finally:
      ckpt.close()
      writer.close()
  return _summarize(workdir, config, s, step_ms, val_losses, last_log, t_start, preempted and step)


_PEER_FAILURES = (
  "Gloo",
  "Barrier failed",
  "heartbeat",
  "Connection reset",
  "UNAVAILABLE",
  "NCCL",
  "DEADLINE_EXCEEDED",
)


def _exit_if_peer_lost(e: Exception) -> None:
  """In a multi-process run, an error of a collective or a barrier means a peer died or was
  stopped: name it in one line and exit (runtime.exit_lost_peer)."""
  if jax.process_count() < 2 or isinstance(e, UserError):
    return
  text = " ".join(str(e).split())
  if "RESOURCE_EXHAUSTED" in text or not (
    isinstance(e, jax.errors.JaxRuntimeError) or any(m in text for m in _PEER_FAILURES)
  ):
    return
  n, me = jax.process_count(), jax.process_index()
  runtime.exit_lost_peer(
    f"process {1 - me}" if n == 2 else "another process",
    describe(RuntimeError(text.split("Error dispatching computation: ")[-1])),
  )


def _resume_note(ckpt: checkpoint.Checkpoints, what: str = "the same command") -> str:
  steps = ckpt.finished_steps()
  return (
    f"rerunning {what} resumes from checkpoint {steps[-1]}"
    if steps
    else f"no checkpoint was saved yet, so rerunning {what} starts from step 0"
  )


def _summarize(
  workdir, config, s: Setup, step_ms, val_losses, last_log, t_start, preempted_at
) -> dict:
  tc = config.train
  wall_s = time.perf_counter() - t_start
  median = float(np.median(step_ms)) if step_ms else None
  tokens_per_step = tc.batch_size * s.model.cfg.block_size
  summary = {
    "steps": tc.num_steps,
    "n_params": count_params(s.abstract.params),
    "mesh": dict(s.mesh.shape),
    "memory": s.memory(),
    "compile_s": s.compile_s,
    "wall_s": wall_s,
    "median_step_ms": median,
    "tokens_per_sec": tokens_per_step / median * 1e3 if median else None,
    "mfu": (
      metrics_lib.throughput(
        tokens_per_step / median * 1e3,
        s.model.cfg,
        jax.device_count(),
        jax.devices()[0].device_kind,
      )["mfu"]
      if median
      else None
    ),
    "final_loss": last_log.get("loss"),
    "final_val_loss": val_losses[-1] if val_losses else None,
    "best_val_loss": min(val_losses) if val_losses else None,
    "preempted_at": preempted_at or None,
  }
  if preempted_at:
    return summary
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
  say(
    f"done: {tc.num_steps} steps; this run {metrics_lib.format_duration(wall_s)} "
    f"(+{s.compile_s:.1f}s compile)"
    + (
      f", median {median:.2f} ms/step, {summary['tokens_per_sec'] / 1e3:.1f}k tok/s"
      if median
      else ""
    )
    + (f", final val_loss {summary['final_val_loss']:.4f}" if val_losses else "")
  )
  return summary

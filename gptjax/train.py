"""Training's pure part: an explicit TrainState pytree, the jitted train and eval steps, and
`setup`, which lays a model out on a mesh and compiles them.

`train_step` and `eval_step` are pure functions of their inputs; everything with side
effects (data, logs, files, signals) is loop.py's.
"""

import dataclasses
import functools
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from gptjax import metrics as metrics_lib
from gptjax import optim, sharding, tree_checks
from gptjax.attention import resolve_implementation
from gptjax.loss import cross_entropy, fused_cross_entropy
from gptjax.model import GPT, GPTConfig, count_params, init_params


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: updates applied so far
  params: Any
  opt_state: Any
  rng: jax.Array  # base dropout key; step keys are fold_in(rng, step)


def _boxed_init(model: GPT, tx: optax.GradientTransformation, rng) -> TrainState:
  """The initial state with params (and Adam's moments) still boxed in their logical names."""
  init_rng, dropout_rng = jax.random.split(rng)
  params = init_params(model, init_rng)
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
  batch,
  rng,
  deterministic: bool,
  label_smoothing: float,
  loss_chunk: int = 0,
):
  """Next-token loss of a batch: a (B, T+1) token array -> the mean over its tokens; a task
  batch (a dict, task_data.PackedBatches) -> the weighted sum over its tokens (the caller
  divides by the global batch's weight). loss_chunk > 0 applies the LM head and the loss
  that many positions at a time (loss.fused_cross_entropy), never all logits at once."""
  weights_BxT, extra = None, {}
  if isinstance(batch, dict):
    weights_BxT = batch["weights"]
    extra = {"positions_BxT": batch["positions"], "segments_BxT": batch["segments"]}
    batch = batch["tokens"]
  inputs_BxT, targets_BxT = batch[:, :-1], batch[:, 1:]
  variables, rngs = {"params": params}, None if deterministic else {"dropout": rng}
  if not loss_chunk:
    logits_BxTxV = model.apply(
      variables, inputs_BxT, deterministic=deterministic, rngs=rngs, **extra
    )
    loss_BxT = cross_entropy(logits_BxTxV, targets_BxT, model.cfg.vocab_size, label_smoothing)
    return loss_BxT.mean() if weights_BxT is None else jnp.sum(loss_BxT * weights_BxT)
  x_BxTxD = model.apply(
    variables,
    inputs_BxT,
    deterministic=deterministic,
    rngs=rngs,
    method=GPT.hidden_states,
    **extra,
  )
  w_VxD = model.apply(variables, method=GPT.output_embedding)
  return fused_cross_entropy(
    x_BxTxD, w_VxD, targets_BxT, model.cfg, loss_chunk, label_smoothing, weights_BxT, mean=False
  )


def train_step(
  state: TrainState,
  batch,
  *,
  model: GPT,
  tx,
  lr_schedule,
  grad_accum: int = 1,
  label_smoothing: float = 0.0,
  loss_chunk: int = 0,
):
  """One optimizer update over a batch -> (new state, metrics).

  batch: (B, T+1) tokens (the loss is their mean), or a task batch (a dict with loss
  weights, packed segments and positions): the loss is the weighted sum over the whole
  global batch divided by its total weight, the same for any grad_accum and any mesh (a
  mean of per-microbatch means would weigh tokens unevenly when masks are uneven).

  With grad_accum > 1 the batch is split into microbatches whose gradients a lax.scan
  adds up, so memory scales with B / grad_accum while the update sees all of B.
  """
  rng = jax.random.fold_in(state.rng, state.step)
  grad_fn = jax.value_and_grad(_loss)
  deterministic = model.cfg.dropout == 0 and model.cfg.attn_dropout == 0
  # Task batches: microbatches' weighted sums over the global batch's weight (all-zero: 0).
  weighted = isinstance(batch, dict)
  denominator = jnp.maximum(jnp.sum(batch["weights"]), 1.0) if weighted else grad_accum
  args = (model, rng, deterministic, label_smoothing, loss_chunk)
  if grad_accum == 1:
    loss, grads = grad_fn(state.params, model, batch, *args[1:])
  else:
    loss, grads = _accumulate(grad_fn, state.params, batch, grad_accum, args)
  if weighted or grad_accum > 1:
    loss, grads = jax.tree.map(lambda x: x / denominator, (loss, grads))
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {
    "loss": loss,
    "grad_norm": optax.tree_utils.tree_norm(grads),
    "lr": lr_schedule(state.step),
    # what a checkpoint of the new state would hold: never save NaN or inf
    "finite": tree_checks.all_finite((params, opt_state)),
  }
  if weighted:
    metrics["trained_tokens"] = jnp.sum(batch["weights"])
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def _accumulate(grad_fn, params, batch, grad_accum: int, args):
  """Sums of (loss, grads) over grad_accum microbatches, in a lax.scan.

  Microbatch i takes rows i, i+A, i+2A, ...: each device's rows split evenly among the
  microbatches, so every microbatch stays spread over all data-parallel devices."""
  model, rng, *rest = args

  def split(x):
    micro = x.reshape(-1, grad_accum, *x.shape[1:]).swapaxes(0, 1)
    return nn.with_logical_constraint(micro, (None, "batch") + (None,) * (x.ndim - 1))

  def accumulate(carry, i_and_micro):
    i, micro = i_and_micro
    loss_i, grads_i = grad_fn(params, model, micro, jax.random.fold_in(rng, i), *rest)
    return jax.tree.map(jnp.add, carry, (loss_i, grads_i)), None

  zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
  micro = jax.tree.map(split, batch)
  return jax.lax.scan(accumulate, zeros, (jnp.arange(grad_accum), micro))[0]


def eval_step(params, batch, *, model: GPT, loss_chunk: int = 0):
  """Mean next-token loss (nats) of a (B, T+1) batch, dropout off; of a task batch,
  (weighted loss sum, total weight), so that evaluations add up over batches."""
  loss = _loss(params, model, batch, None, True, 0.0, loss_chunk)
  return jnp.stack([loss, jnp.sum(batch["weights"])]) if isinstance(batch, dict) else loss


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

  def batch(self, local_rows):
    """This process's rows (an int32 array, or a task batch's dict of arrays) -> the global,
    sharded batch."""
    if isinstance(local_rows, dict):
      B = self.batch_shape[0]
      return {
        k: sharding.global_batch(v, self.batch_sharding, (B, *v.shape[1:]))
        for k, v in local_rows.items()
      }
    return sharding.global_batch(local_rows, self.batch_sharding, self.batch_shape)

  def memory(self) -> dict:
    return metrics_lib.memory_report(self.abstract, self.state_shardings, self.train_step)

  def describe(self, packed: bool) -> list[str]:
    """What a run prints once compiled: the model, the compile time, the mesh and memory."""
    cfg, params = self.model.cfg, self.abstract.params
    attention = resolve_implementation(cfg.attention, cfg.dtype)
    if packed and attention != "xla":  # attention.py: segment masks take XLA's path
      attention = "xla (packed rows need a segment mask, which cuDNN's fused kernel cannot take)"
    mem, fmt = self.memory(), metrics_lib.format_bytes
    temporaries = (
      f", step temporaries {fmt(mem['temp'])}, peak ~{fmt(mem['peak_estimate'])}"
      if "temp" in mem
      else ""
    )
    return [
      f"model: {count_params(params) / 1e6:.2f}M parameters ("
      f"{count_params(params, True) / 1e6:.2f}M without embeddings), vocab "
      f"{cfg.vocab_size} padded to {cfg.padded_vocab}, {jnp.dtype(cfg.dtype).name} compute, "
      f"attention {attention}",
      f"compiled train and eval steps in {self.compile_s:.1f}s",
      f"mesh {dict(self.mesh.shape)} over {jax.device_count()} {jax.default_backend()} "
      f"device(s), {jax.process_count()} process(es); per device: params "
      f"{fmt(mem['params'])}, optimizer state {fmt(mem['opt_state'])}{temporaries}",
    ]


def setup(config, vocab_size: int, mesh: jax.sharding.Mesh, compile: bool = True) -> Setup:
  """Checks that the config fits the mesh, derives every sharding and compiles both steps.

  Shardings come from the abstract state's logical names and config.mesh.rules; the steps
  are jitted with explicit in/out shardings and compiled ahead of time (compile=False: the
  layout only, steps None).
  """
  train_config, rules = config.train, sharding.rules(config.mesh)
  sharding.check_batch(train_config.batch_size, config.optim.grad_accum, mesh, rules)
  model = GPT(GPTConfig.from_config(config.model, vocab_size))
  resolve_implementation(model.cfg.attention, model.cfg.dtype)  # fail before compiling
  lr_schedule = optim.schedule(config.optim, train_config.num_steps)
  tx = optim.make(config.optim, train_config.num_steps)
  boxed = abstract_state(model, tx, config.seed)
  sharding.check_divisible(boxed.params, mesh, rules)
  state_sh = sharding.tree_shardings(boxed, mesh, rules)
  abstract = nn.meta.unbox(boxed)
  batch_sh = sharding.batch_sharding(mesh, rules)
  shape = (train_config.batch_size, model.cfg.block_size + 1)
  batch_spec = _batch_spec(shape, batch_sh, task=config.data.source == "task")
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  loss_chunk = train_config.loss_chunk
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
          label_smoothing=train_config.label_smoothing,
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


def _batch_spec(shape, batch_sh, task: bool):
  """The step's batch argument: (B, T+1) tokens, or a task batch (task_data.PackedBatches)."""
  tokens = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sh)
  if not task:
    return tokens
  per_target = lambda dtype: jax.ShapeDtypeStruct(
    (shape[0], shape[1] - 1), dtype, sharding=batch_sh
  )
  return {
    "tokens": tokens,
    "weights": per_target(jnp.float32),
    "segments": per_target(jnp.int32),
    "positions": per_target(jnp.int32),
  }

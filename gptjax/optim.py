"""Optimizer: global-norm clipping + AdamW on a warmup-cosine schedule (optax)."""

import jax
import optax


def schedule(optim_config, num_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to lr over warmup_steps, cosine down to min_lr at decay_steps."""
  decay_steps = optim_config.decay_steps or num_steps
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=optim_config.lr,
    warmup_steps=optim_config.warmup_steps,
    decay_steps=max(decay_steps, optim_config.warmup_steps + 1),
    end_value=optim_config.min_lr,
  )


def decay_mask(params):
  """True where weight decay applies: dense kernels, never embeddings, biases or norm scales.

  By name, not rank: attention biases are 2-D (heads, kv) yet must not decay.
  """

  def is_kernel(path, _):  # the last dict key: boxed (nn.Partitioned) leaves add '.value'
    keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return keys[-1] == "kernel"

  return jax.tree_util.tree_map_with_path(is_kernel, params)


def make(optim_config, num_steps: int) -> optax.GradientTransformation:
  """The optimizer for `config.optim`; gradient accumulation happens in the train step."""
  parts = [optax.clip_by_global_norm(optim_config.grad_clip)] if optim_config.grad_clip > 0 else []
  parts.append(
    optax.adamw(
      schedule(optim_config, num_steps),
      b1=optim_config.b1,
      b2=optim_config.b2,
      eps=optim_config.eps,
      weight_decay=optim_config.weight_decay,
      mask=decay_mask,
    )
  )
  return optax.chain(*parts)

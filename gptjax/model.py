"""A decoder-only GPT in Flax Linen: GPT-2 layout by default, with ablation switches.

Every parameter carries logical axis names (vocab, embed, mlp, heads, kv) and activations are
constrained to (batch, length, ...), so sharding is one rules table (see the sharding issue)
and never a per-parameter decision here.
"""

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gptjax import int8_kernel
from gptjax.attention import CausalSelfAttention
from gptjax.errors import UserError
from gptjax.layers import SCALE, Embed, Projection

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# What each block keeps for the backward pass (config.model.remat); the rest is recomputed.
#   none   everything (fastest, most memory)
#   dots   every matmul output, attention's batched ones included; recompute elementwise work
#   dots_no_batch  the weight matmuls only; recompute attention scores and elementwise work
#   full   only the block's input: recompute the whole block (least memory, ~+1/3 FLOPs)
REMAT_POLICIES = {
  "none": None,
  "dots": jax.checkpoint_policies.dots_saveable,
  "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  "full": jax.checkpoint_policies.nothing_saveable,
}


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  """Resolved model hyperparameters (no 'auto' or None left)."""

  vocab_size: int  # real tokens; logits beyond it are padding and masked out
  padded_vocab: int
  n_layer: int
  n_head: int
  d_model: int
  d_ff: int
  block_size: int
  dropout: float = 0.0
  attn_dropout: float = 0.0
  norm: str = "layernorm"
  norm_eps: float = 1e-5
  positions: str = "learned"
  rope_theta: float = 10000.0
  activation: str = "gelu"
  tie_embeddings: bool = True
  bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention: str = "auto"
  init_std: float = 0.02
  remat: str = "none"
  scan_layers: bool = False
  quant: str = "none"  # int8: int8 weights with float scales (layers.py, quantize.py)
  kv_quant: str = "none"  # int8: an int8 KV cache with a scale per token and head

  @classmethod
  def from_config(cls, model_config, vocab_size: int) -> "GPTConfig":
    """From the `config.model` ConfigDict and the tokenizer's vocabulary size."""
    vocab = model_config.vocab_size or vocab_size
    if vocab < vocab_size:
      raise UserError(
        f"config.model.vocab_size={vocab} is smaller than the tokenizer's "
        f"{vocab_size} ids; leave it unset or raise it"
      )
    d_ff = model_config.d_ff or (
      4 * model_config.d_model
      if model_config.activation == "gelu"
      else _round_up(8 * model_config.d_model // 3, 64)
    )  # SwiGLU: ~same params as GELU
    dtype = model_config.dtype
    if dtype == "auto":
      dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    return cls(
      vocab_size=vocab,
      padded_vocab=_round_up(vocab, model_config.vocab_multiple),
      n_layer=model_config.n_layer,
      n_head=model_config.n_head,
      d_model=model_config.d_model,
      d_ff=d_ff,
      block_size=model_config.block_size,
      dropout=model_config.dropout,
      attn_dropout=model_config.attn_dropout,
      norm=model_config.norm,
      norm_eps=model_config.norm_eps,
      positions=model_config.positions,
      rope_theta=model_config.rope_theta,
      activation=model_config.activation,
      tie_embeddings=model_config.tie_embeddings,
      bias=model_config.bias,
      dtype=_DTYPES[dtype],
      param_dtype=_DTYPES[model_config.param_dtype],
      attention=model_config.attention,
      init_std=model_config.init_std,
      remat=model_config.remat,
      scan_layers=model_config.scan_layers,
      quant=model_config.quant,
      kv_quant=model_config.kv_quant,
    )


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _norm(cfg: GPTConfig, name: str) -> nn.Module:
  scale_init = nn.with_logical_partitioning(nn.initializers.ones, ("embed",))
  if cfg.norm == "rmsnorm":
    return nn.RMSNorm(
      epsilon=cfg.norm_eps,
      dtype=cfg.dtype,
      param_dtype=cfg.param_dtype,
      scale_init=scale_init,
      name=name,
    )
  return nn.LayerNorm(
    epsilon=cfg.norm_eps,
    use_bias=cfg.bias,
    dtype=cfg.dtype,
    param_dtype=cfg.param_dtype,
    scale_init=scale_init,
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
    name=name,
  )


class MLP(nn.Module):
  """(B, T, D) -> (B, T, D): GELU, or SwiGLU (silu(gate) * up)."""

  cfg: GPTConfig

  @nn.compact
  def __call__(self, x_BxTxD):
    cfg = self.cfg
    d, f = cfg.d_model, cfg.d_ff
    up_init = nn.initializers.normal(cfg.init_std)
    up = functools.partial(Projection, cfg, (d, f), ("embed", "mlp"), 1, up_init)
    h_BxTxF = up(name="up")(x_BxTxD)
    if cfg.activation == "swiglu":
      h_BxTxF = nn.silu(up(name="gate")(x_BxTxD)) * h_BxTxF
    else:
      h_BxTxF = nn.gelu(h_BxTxF, approximate=True)  # GPT-2's tanh GELU
    h_BxTxF = nn.with_logical_constraint(h_BxTxF, ("batch", "length", "mlp"))
    down_init = nn.initializers.normal(cfg.init_std / (2 * cfg.n_layer) ** 0.5)
    return Projection(cfg, (f, d), ("mlp", "embed"), 1, down_init, name="down")(h_BxTxF)


class Block(nn.Module):
  """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

  cfg: GPTConfig

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, deterministic: bool, start_B=None, segments_BxT=None):
    cfg = self.cfg
    drop = nn.Dropout(cfg.dropout)
    y = CausalSelfAttention(cfg, name="attn")(
      _norm(cfg, "ln_1")(x_BxTxD), positions_BxT, deterministic, start_B, segments_BxT
    )
    x_BxTxD = x_BxTxD + drop(y, deterministic=deterministic)
    y = MLP(cfg, name="mlp")(_norm(cfg, "ln_2")(x_BxTxD))
    x_BxTxD = x_BxTxD + drop(y, deterministic=deterministic)
    return nn.with_logical_constraint(x_BxTxD, ("batch", "length", "embed"))


class GPT(nn.Module):
  """A decoder-only transformer, in parts (as Levanter's LmHeadModel):

    hidden_states(tokens (B, T) int32) -> final hidden states (B, T, D), after ln_f
    output_embedding()               -> the output embedding (padded V, D)
    __call__(tokens)                 -> logits (B, T, padded_vocab) in the compute dtype

  A loss or a quantized head composes the first two (loss.fused_cross_entropy).

  With start_B (decoding, see decode.py) attention reads and extends a KV cache held in the
  "cache" collection; rows are left-padded and row b's first real token is at start_B[b].
  """

  cfg: GPTConfig

  def __call__(
    self,
    tokens_BxT,
    positions_BxT=None,
    deterministic: bool = True,
    start_B=None,
    segments_BxT=None,
  ):
    x_BxTxD = self.hidden_states(tokens_BxT, positions_BxT, deterministic, start_B, segments_BxT)
    if self.cfg.quant == "int8":
      return vocab_logits(x_BxTxD, None, self.cfg, int8_head=self._int8_head())
    return vocab_logits(x_BxTxD, self.output_embedding(), self.cfg)

  def output_embedding(self):
    """(padded V, D): the input table when tied, else lm_head's (D, V) kernel transposed."""
    params = nn.meta.unbox(self.variables["params"])  # boxed while initialising
    if self.cfg.tie_embeddings:
      return params["wte"]["embedding"]
    return params["lm_head"]["kernel"].T

  def _int8_head(self):
    """int8: (table, scale per vocabulary entry, layout) of the output head, the table as
    stored: the tied (V, D) embedding ("nk") or lm_head's (D, V) kernel ("kn")."""
    params = nn.meta.unbox(self.variables["params"])
    if self.cfg.tie_embeddings:
      return params["wte"]["embedding"], params["wte"]["embedding" + SCALE], "nk"
    return params["lm_head"]["kernel"], params["lm_head"]["kernel" + SCALE], "kn"

  @nn.compact
  def hidden_states(
    self,
    tokens_BxT,
    positions_BxT=None,
    deterministic: bool = True,
    start_B=None,
    segments_BxT=None,
  ):
    """segments_BxT: packed rows (several examples in one row, ids from 1; 0 is padding):
    attention stays within a segment. Positions then restart per segment (pass them)."""
    cfg = self.cfg
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape)
    wte = Embed(cfg, cfg.padded_vocab, ("vocab", "embed"), name="wte")
    x_BxTxD = wte.lookup(tokens_BxT, ("vocab", None))
    if cfg.positions == "learned":
      wpe = Embed(cfg, cfg.block_size, (None, "embed"), name="wpe")
      x_BxTxD += wpe.lookup(positions_BxT, (None, None))
    x_BxTxD = nn.Dropout(cfg.dropout)(x_BxTxD, deterministic=deterministic)
    x_BxTxD = nn.with_logical_constraint(x_BxTxD, ("batch", "length", "embed"))
    x_BxTxD = self._blocks(x_BxTxD, positions_BxT, deterministic, start_B, segments_BxT)
    if not cfg.tie_embeddings:
      _Unembed(cfg, name="lm_head")()  # created with the rest; output_embedding() reads it
    return _norm(cfg, "ln_f")(x_BxTxD)

  def _blocks(self, x_BxTxD, positions_BxT, deterministic: bool, start_B, segments_BxT):
    """The n_layer blocks, per layer (h_0 ... h_{L-1}) or scanned (h, see LAYERS)."""
    cfg = self.cfg
    block = Block
    if cfg.remat != "none" and start_B is None:  # training: recompute in the backward pass
      # static_argnums counts self as 0: `deterministic` is a Python bool.
      block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], static_argnums=(3,))
    if not cfg.scan_layers:
      for i in range(cfg.n_layer):
        x_BxTxD = block(cfg, name=layer_name(i))(
          x_BxTxD, positions_BxT, deterministic, start_B, segments_BxT
        )
      return x_BxTxD

    # One block compiled once and looped n_layer times over stacked parameters (and KV
    # caches) with a leading "layers" axis: compile time no longer grows with depth, and
    # an FSDP step gathers one layer's weights at a time.
    def body(blk, x_BxTxD, positions_BxT, start_B, segments_BxT):
      return blk(x_BxTxD, positions_BxT, deterministic, start_B, segments_BxT), None

    x_BxTxD, _ = nn.scan(
      body,
      variable_axes={"params": 0, "cache": 0},
      split_rngs={"params": True, "dropout": True},
      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
      length=cfg.n_layer,
      metadata_params={nn.PARTITION_NAME: "layers"},
    )(block(cfg, name=STACKED), x_BxTxD, positions_BxT, start_B, segments_BxT)
    return x_BxTxD


class _Unembed(nn.Module):
  """The untied lm_head's (D, V) kernel (laid out as nn.Dense's, so checkpoints match)."""

  cfg: GPTConfig

  @nn.compact
  def __call__(self):
    cfg, axes = self.cfg, ("embed", "vocab")
    shape = (cfg.d_model, cfg.padded_vocab)
    if cfg.quant == "int8":  # one scale per vocabulary column
      self.param(
        "kernel" + SCALE, nn.with_logical_partitioning(nn.initializers.ones, axes[1:]), shape[1:]
      )
      return self.param(
        "kernel", nn.with_logical_partitioning(nn.initializers.zeros, axes), shape, jnp.int8
      )
    init = nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), axes)
    return self.param("kernel", init, shape, cfg.param_dtype)


def vocab_logits(x_BxTxD, w_VxD, cfg: GPTConfig, out_dtype=None, int8_head=None):
  """Final hidden states (B, T, D) -> logits (B, T, padded_vocab), in the compute dtype unless
  out_dtype says otherwise; padding entries are masked so they are never predicted.
  int8_head: (int8 table, its float32 scale per vocabulary entry, layout), used instead of
  w_VxD (GPT._int8_head)."""
  if int8_head is not None:
    w, scale_V, layout = int8_head
    x_BxTxD = x_BxTxD.astype(cfg.dtype)
    logits_BxTxV = int8_kernel.matmul(x_BxTxD, w, scale_V, layout, 1, out_dtype or cfg.dtype)
  else:
    logits_BxTxV = jnp.einsum(
      "btd,vd->btv",
      x_BxTxD.astype(cfg.dtype),
      w_VxD.astype(cfg.dtype),
      preferred_element_type=out_dtype,
    )
  logits_BxTxV = nn.with_logical_constraint(logits_BxTxV, ("batch", "length", "vocab"))
  if cfg.padded_vocab > cfg.vocab_size:  # padding rows exist for speed, never as predictions
    real_V = jnp.arange(cfg.padded_vocab) < cfg.vocab_size
    logits_BxTxV = jnp.where(real_V, logits_BxTxV, jnp.finfo(logits_BxTxV.dtype).min)
  return logits_BxTxV


# --- The layer layout (config.model.scan_layers) -------------------------------------------
# Per layer, the blocks' parameters are h_0 ... h_{L-1}; scanned, one STACKED subtree whose
# leaves have a leading "layers" axis. Only this module knows that: training's init, Hugging
# Face interop and checkpoint checks convert or ask through the functions below.
STACKED = "h"


def layer_name(i: int) -> str:
  """The per-layer params of block i (h_0 ... h_{L-1})."""
  return f"{STACKED}_{i}"


def init_params(model: GPT, rng):
  """Initial parameters, boxed in their logical names. A scanned model starts from the
  per-layer model's values, stacked: scanning changes how a step compiles, never where a
  run starts."""
  tokens_1xT = jnp.zeros((1, model.cfg.block_size), jnp.int32)
  if not model.cfg.scan_layers:
    return model.init(rng, tokens_1xT)["params"]
  loop = GPT(dataclasses.replace(model.cfg, scan_layers=False))
  return to_layout(loop.init(rng, tokens_1xT)["params"], model.cfg)


def to_layout(params, cfg: GPTConfig, xp=jnp) -> dict:
  """Per-layer params (h_0 ... h_{L-1}) -> cfg's layout (stacked when scanned).

  xp: the array module that stacks (numpy keeps host arrays on the host)."""
  if not cfg.scan_layers:
    return params

  def stack(*xs):  # boxed leaves (logical names) gain the leading "layers" name, as nn.scan's
    if isinstance(xs[0], nn.Partitioned):
      return xs[0].replace(value=xp.stack([x.value for x in xs]), names=("layers",) + xs[0].names)
    return xp.stack(xs)

  out = {k: v for k, v in params.items() if not k.startswith(STACKED + "_")}
  out[STACKED] = jax.tree.map(
    stack,
    *[params[layer_name(i)] for i in range(cfg.n_layer)],
    is_leaf=lambda x: isinstance(x, nn.Partitioned),
  )
  return out


def per_layer(params, cfg: GPTConfig) -> dict:
  """Params in cfg's layout -> per-layer params h_0 ... h_{L-1}."""
  if not cfg.scan_layers:
    return params
  out = {k: v for k, v in params.items() if k != STACKED}
  for i in range(cfg.n_layer):
    out[layer_name(i)] = jax.tree.map(lambda x, i=i: x[i], params[STACKED])
  return out


def is_stacked(param_names) -> bool:
  """Whether parameter names ('h/attn/...' or 'h_0/attn/...') are in the scanned layout."""
  return any(n.startswith(STACKED + "/") for n in param_names)


def abstract_params(config, boxed: bool = False):
  """Shapes and dtypes of the parameters a config makes (nothing allocated); boxed keeps
  their logical axis names (for shardings).

  config.model.vocab_size must be resolved (as in a run's config.json).
  """
  model = GPT(GPTConfig.from_config(config.model, config.model.vocab_size))
  tree = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))
  return tree if boxed else nn.meta.unbox(tree)


def count_params(params, exclude_embeddings: bool = False) -> int:
  """Number of parameters; optionally without the token/position embedding tables."""
  leaves = jax.tree_util.tree_leaves_with_path(params)
  return sum(int(x.size) for path, x in leaves if not (exclude_embeddings and _is_embedding(path)))


def _is_embedding(path) -> bool:
  return any(getattr(k, "key", None) in ("wte", "wpe") for k in path)

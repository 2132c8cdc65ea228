"""Device mesh, logical-axis rules and the shardings derived from them (the processes that
make up the devices are runtime.py's).

Mesh axes:
  data    pure data parallelism: the batch is split, parameters are replicated.
  fsdp    data parallelism with parameters and optimizer state split too (ZeRO-3).
  tensor  Megatron-style model parallelism: heads, MLP width and vocabulary are split.

Every axis is `AxisType.Auto`: XLA's partitioner propagates shardings from jit's in/out
shardings and the model's logical constraints, so Linen code needs no per-op annotation
(Explicit axes would make every op's sharding part of its type).

The model names its dimensions (batch, length, vocab, embed, heads, kv, mlp; layers with
scan_layers); one table, `config.mesh.rules`, maps those names to mesh axes. Shardings of
the whole train state come from that table and the abstract state (jax.eval_shape), never
per parameter by hand.
"""

import contextlib
import math

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from gptjax.config import MESH_AXES
from gptjax.errors import UserError

# Rule precedence: a mesh axis serves at most one dimension of an array, and earlier names
# claim theirs first. batch comes first so activations (batch, length, embed) split the batch
# over (data, fsdp) and leave embed whole, while parameters (vocab, embed) split embed.
LOGICAL_AXES = ("batch", "length", "vocab", "embed", "heads", "kv", "mlp", "layers")


def rules(mesh_config) -> tuple:
  """config.mesh.rules as flax's ordered (logical name, mesh axes) pairs (validate() has
  checked the axis names)."""
  out = []
  for name in LOGICAL_AXES:
    axes = tuple(a.strip() for a in mesh_config.rules[name].split(",") if a.strip())
    out.append((name, axes if len(axes) > 1 else (axes[0] if axes else None)))
  return tuple(out)


def make_mesh(mesh_config, devices=None) -> Mesh:
  """The (data, fsdp, tensor) mesh over all devices, from config.mesh.shape (and dcn_shape).

  shape is the split within a slice or host (fast links); dcn_shape the split across slices
  or hosts (data-center network). Tensor is the last, fastest-varying axis, so its groups
  sit on neighbouring devices (one host's NVLink, one TPU slice's ICI).
  """
  devices = jax.devices() if devices is None else devices
  dcn = [int(mesh_config.dcn_shape[a]) for a in MESH_AXES]
  ici = [int(mesh_config.shape[a]) for a in MESH_AXES]
  fixed = math.prod(n for n in ici if n != -1) * math.prod(dcn)
  if -1 in ici and len(devices) % fixed == 0:
    ici[ici.index(-1)] = len(devices) // fixed
  if -1 in ici or math.prod(ici) * math.prod(dcn) != len(devices):
    sizes = [-1 if i == -1 else i * d for i, d in zip(ici, dcn)]
    need = f"a multiple of {fixed}" if -1 in ici else str(fixed)
    raise UserError(
      f"the mesh {_fmt(MESH_AXES, sizes)} needs {need} devices but {len(devices)} "
      f"{devices[0].platform} device(s) are available; set --config.mesh.shape.AXIS so the "
      "sizes multiply to the device count (one axis may be -1 to fill)"
    )
  if math.prod(dcn) > 1:
    # TPU multi-slice: the granules are slices; otherwise (GPU or CPU hosts) processes.
    granule = len({getattr(d, "slice_index", 0) for d in devices}) == 1
    try:
      grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=granule)
    except ValueError as e:
      raise UserError(
        f"config.mesh.dcn_shape={_fmt(MESH_AXES, dcn)} does not fit the "
        f"{'processes' if granule else 'slices'} ({e}); its product must be the "
        f"number of {'processes' if granule else 'slices'}"
      ) from None
  else:
    grid = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _fmt(names, sizes) -> str:
  return "(" + ", ".join(f"{n}={s}" for n, s in zip(names, sizes)) + ")"


@contextlib.contextmanager
def context(mesh: Mesh, logical_rules):
  """While tracing: the mesh and rules that the model's logical constraints resolve against."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(logical_rules):
    yield


def tree_shardings(boxed_tree, mesh: Mesh, logical_rules):
  """NamedShardings for an abstract pytree whose leaves carry logical names (nn.Partitioned).

  Unnamed leaves (step, rng, Adam's count) are replicated.
  """
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, logical_rules)


def check_divisible(boxed_params, mesh: Mesh, logical_rules) -> None:
  """Raises UserError naming the first parameter dimension its mesh axes do not divide."""
  leaves = jax.tree_util.tree_leaves_with_path(
    boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned)
  )
  for path, leaf in leaves:
    if not isinstance(leaf, nn.Partitioned):
      continue
    mesh_axes = nn.logical_to_mesh_axes(leaf.names, logical_rules)
    for dim, (size, logical, axes) in enumerate(zip(leaf.value.shape, leaf.names, mesh_axes)):
      axes = (axes,) if isinstance(axes, str) else (axes or ())
      ways = math.prod(mesh.shape[a] for a in axes)
      if size % ways:
        raise UserError(
          f"parameter {param_name(path)} has {logical} dimension {dim} of size {size}, which the mesh "
          f"axes {'x'.join(axes)}={ways} do not divide; change the model size or "
          f"--config.mesh.shape, or map {logical} elsewhere with --config.mesh.rules."
          f"{logical}"
        )


def param_name(path) -> str:
  """'h_0/mlp/up/kernel' for a pytree path (boxed leaves' '.value' left out)."""
  return "/".join(
    str(getattr(k, "key", getattr(k, "name", k)))
    for k in path
    if getattr(k, "name", None) != "value"
  )


def batch_sharding(mesh: Mesh, logical_rules) -> NamedSharding:
  """Sharding of a (B, T+1) token batch: rows over the data-parallel axes."""
  return nn.logical_to_mesh_sharding(PartitionSpec("batch", None), mesh, logical_rules)


def _batch_axes(mesh: Mesh, logical_rules) -> tuple:
  spec = batch_sharding(mesh, logical_rules).spec[0]
  return (spec,) if isinstance(spec, str) else tuple(spec or ())


def data_parallel_size(mesh: Mesh, logical_rules) -> int:
  return math.prod(mesh.shape[a] for a in _batch_axes(mesh, logical_rules))


def check_batch(batch_size: int, grad_accum: int, mesh: Mesh, logical_rules) -> None:
  dp = data_parallel_size(mesh, logical_rules)
  micro = batch_size // grad_accum
  if micro % dp:
    what = (
      f"config.train.batch_size={batch_size}"
      if grad_accum == 1
      else f"the microbatch (batch_size={batch_size} / grad_accum={grad_accum} = {micro})"
    )
    raise UserError(
      f"{what} is not divisible by the data-parallel size {dp} (the mesh axes "
      f"that split the batch: {_dp_axes(mesh, logical_rules)}); make it a "
      f"multiple of {dp} or change --config.mesh.shape"
    )


def _dp_axes(mesh, logical_rules) -> str:
  return " x ".join(f"{a}={mesh.shape[a]}" for a in _batch_axes(mesh, logical_rules)) or "none"


def process_rows(sharding: NamedSharding, global_shape) -> slice:
  """The rows of a global batch that this process's devices hold (it loads only those)."""
  spans = set()
  for index in sharding.addressable_devices_indices_map(tuple(global_shape)).values():
    start, stop, _ = index[0].indices(global_shape[0])
    spans.add((start, stop))
  spans = sorted(spans)
  lo, hi = spans[0][0], spans[-1][1]
  if sum(b - a for a, b in spans) != hi - lo:  # only contiguous shares can be assembled
    raise UserError(
      f"this process's batch rows {spans} are not contiguous: split the batch "
      "across hosts with --config.mesh.dcn_shape.data and within a host with "
      "mesh.shape (keep dcn_shape.fsdp=1 and rules.batch=data,fsdp)"
    )
  return slice(lo, hi)


def global_batch(local_rows: np.ndarray, sharding: NamedSharding, global_shape) -> jax.Array:
  """This process's rows -> the global batch array (one process: just a device_put)."""
  return jax.make_array_from_process_local_data(sharding, local_rows, tuple(global_shape))

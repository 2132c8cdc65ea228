"""Device mesh, logical-axis rules and the shardings derived from them; multi-host start-up.

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
import os
import re
import sys
import threading
import time

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from gptjax.errors import UserError, ensure_writable_dir

AXES = ("data", "fsdp", "tensor")
# Rule precedence: a mesh axis serves at most one dimension of an array, and earlier names
# claim theirs first. batch comes first so activations (batch, length, embed) split the batch
# over (data, fsdp) and leave embed whole, while parameters (vocab, embed) split embed.
LOGICAL_AXES = ("batch", "length", "vocab", "embed", "heads", "kv", "mlp", "layers")


def rules(mc) -> tuple:
  """config.mesh.rules as flax's ordered (logical name, mesh axes) pairs."""
  out = []
  for name in LOGICAL_AXES:
    spec = mc.rules.get(name) or ""  # .get: runs saved before "layers" existed
    axes = tuple(a.strip() for a in spec.split(",") if a.strip())
    for a in axes:
      if a not in AXES:
        raise UserError(
          f"config.mesh.rules.{name}={spec!r} names mesh axis {a!r}; mesh axes "
          f"are {', '.join(AXES)} (comma-separated, '' for replicated)"
        )
    out.append((name, axes if len(axes) > 1 else (axes[0] if axes else None)))
  return tuple(out)


def make_mesh(mc, devices=None) -> Mesh:
  """The (data, fsdp, tensor) mesh over all devices, from config.mesh.shape (and dcn_shape).

  shape is the split within a slice or host (fast links); dcn_shape the split across slices
  or hosts (data-center network). Tensor is the last, fastest-varying axis, so its groups
  sit on neighbouring devices (one host's NVLink, one TPU slice's ICI).
  """
  devices = jax.devices() if devices is None else devices
  dcn = [int(mc.dcn_shape[a]) for a in AXES]
  ici = [int(mc.shape[a]) for a in AXES]
  if any(n < 1 for n in dcn) or any(n < 1 and n != -1 for n in ici) or ici.count(-1) > 1:
    raise UserError(
      f"config.mesh.shape={_fmt(AXES, ici)} / dcn_shape={_fmt(AXES, dcn)}: sizes "
      "must be positive, with at most one -1 (fill) in mesh.shape"
    )
  fixed = math.prod(n for n in ici if n != -1) * math.prod(dcn)
  if -1 in ici and len(devices) % fixed == 0:
    ici[ici.index(-1)] = len(devices) // fixed
  if -1 in ici or math.prod(ici) * math.prod(dcn) != len(devices):
    sizes = [-1 if i == -1 else i * d for i, d in zip(ici, dcn)]
    need = f"a multiple of {fixed}" if -1 in ici else str(fixed)
    raise UserError(
      f"the mesh {_fmt(AXES, sizes)} needs {need} devices but {len(devices)} "
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
        f"config.mesh.dcn_shape={_fmt(AXES, dcn)} does not fit the "
        f"{'processes' if granule else 'slices'} ({e}); its product must be the "
        f"number of {'processes' if granule else 'slices'}"
      ) from None
  else:
    grid = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
  return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


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


def per_device_bytes(abstract_tree, shardings) -> int:
  """Bytes one device holds of a pytree laid out by `shardings`."""
  total = 0
  for leaf, s in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)):
    total += math.prod(s.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
  return total


def memory_report(abstract_state, state_shardings, compiled) -> dict:
  """Per-device bytes: parameters, optimizer state, and the compiled step's temporaries."""
  report = {
    "params": per_device_bytes(abstract_state.params, state_shardings.params),
    "opt_state": per_device_bytes(abstract_state.opt_state, state_shardings.opt_state),
  }
  try:
    stats = compiled.memory_analysis()
  except Exception:  # not every backend implements it
    stats = None
  if stats is not None:
    report["temp"] = int(stats.temp_size_in_bytes)
    report["arguments"] = int(stats.argument_size_in_bytes)
    report["outputs"] = int(stats.output_size_in_bytes)
    report["aliased"] = int(stats.alias_size_in_bytes)
    # Donated state aliases the outputs, so the peak is arguments + temporaries + new outputs.
    report["peak_estimate"] = (
      report["arguments"] + report["temp"] + report["outputs"] - report["aliased"]
    )
  return report


def device_memory_limit() -> tuple[int | None, str]:
  """Bytes one device may use, and where the figure comes from (None if unknown).

  GPUs/TPUs report their allocator's limit. Simulated CPU devices share the host's RAM.
  """
  device = jax.local_devices()[0]
  try:
    stats = device.memory_stats() or {}
  except Exception:
    stats = {}
  if stats.get("bytes_limit"):
    return int(stats["bytes_limit"]), f"{device.device_kind} memory"
  if device.platform == "cpu":
    try:
      ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
      return None, ""
    n = jax.local_device_count()
    return ram // n, f"host RAM / {n} CPU device(s)"
  return None, ""


def check_fits(report: dict) -> None:
  """Raises UserError when the compiled step's peak estimate exceeds a device's memory."""
  limit, source = device_memory_limit()
  peak = report.get("peak_estimate")
  if limit and peak and peak > limit:
    raise UserError(
      f"the train step needs ~{format_bytes(peak)} per device but a device has "
      f"{format_bytes(limit)} ({source}); raise --config.optim.grad_accum, shard over more "
      "devices (--config.mesh.shape.fsdp), or shorten --config.model.block_size"
    )


def format_bytes(n: int) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024


# --- Start-up: XLA flags, several hosts ---------------------------------------------------

# XLA flags gptjax sets unless XLA_FLAGS already names them (read once, when the backend
# starts). GPU: the latency-hiding scheduler lets XLA overlap FSDP's all-gathers /
# reduce-scatters and data parallelism's all-reduces with compute on several GPUs (on one
# GPU it changes nothing measurable); other platforms ignore it.
XLA_GPU_FLAGS = ("--xla_gpu_enable_latency_hiding_scheduler=true",)
# One-device runs on CPU-only hosts (no GPU/TPU plugin), jaxlib 0.10 (where measured): YNNPACK takes
# the matmuls only; XLA's own loops do reductions and elementwise work, which YNNPACK ran
# slower (tiny Shakespeare :cpu, 2 cores: 68-76 -> 54-59 ms/step).
XLA_CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=dot",)
_ACCELERATOR_PLUGINS = (
  "jax_cuda12_plugin",
  "jax_cuda13_plugin",
  "jax_rocm60_plugin",
  "jax_rocm7_plugin",
  "libtpu",
)


def cpu_only() -> bool:
  """True when JAX will run on the CPU: JAX_PLATFORMS says cpu, or no accelerator plugin."""
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  import importlib.util

  return not any(importlib.util.find_spec(name) for name in _ACCELERATOR_PLUGINS)


def cpu_device_count(requested: int, batch_size: int) -> int:
  """config.cpu_devices -> devices to simulate: -1 is one per core, as many as divide the
  batch (XLA's per-op threading costs more than one all-reduce of the gradients)."""
  if requested != -1:
    return requested
  cores = os.cpu_count() or 1
  return max(n for n in range(1, min(cores, batch_size) + 1) if batch_size % n == 0)


def set_xla_flags(cpu_devices: int = 0) -> None:
  """Adds gptjax's XLA flags to XLA_FLAGS; call before JAX starts its backend.

  cpu_devices > 1 on a CPU-only host splits the CPU into that many JAX devices (the mesh's
  data axis then runs one batch shard per core), unless XLA_FLAGS already sets a count.
  """
  import jaxlib.version

  flags = list(XLA_GPU_FLAGS)
  current = os.environ.get("XLA_FLAGS", "")
  count = re.search(r"--xla_force_host_platform_device_count=(\d+)", current)
  if cpu_only():
    devices = int(count.group(1)) if count else cpu_devices
    # Measured with one CPU device only; several in-process devices are left as XLA has them.
    if jaxlib.version.__version__.startswith("0.10.") and devices <= 1:
      flags += XLA_CPU_FLAGS
    if cpu_devices > 1:
      flags.append(f"--xla_force_host_platform_device_count={cpu_devices}")
  extra = [f for f in flags if f.split("=")[0] not in current]
  if extra:
    os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()


def use_compilation_cache(directory: str | None) -> None:
  """Turns on JAX's persistent compilation cache in `directory` ('' or None: off).

  A rerun, a resumed job or the next sweep variant of the same shapes then loads its compiled
  steps from disk instead of compiling them again (minutes for large models). Call before
  the first compilation.
  """
  if not directory:
    return
  path = os.path.expanduser(directory)
  try:
    ensure_writable_dir(path, "--config.compilation_cache_dir")
  except UserError as e:  # a cache is an optimisation: say so and go on without it
    print(f"warning: no compilation cache ({e})", flush=True)
    return
  jax.config.update("jax_compilation_cache_dir", path)


def start(config) -> Mesh:
  """XLA flags, the processes of a multi-host job, the mesh and the compilation cache, in the
  order JAX needs them (flags before the backend starts, the cache before compiling)."""
  set_xla_flags(
    cpu_device_count(config.cpu_devices, config.train.batch_size // config.optim.grad_accum)
  )
  initialize_distributed(config.distributed)
  watch_peers(config.distributed.heartbeat_timeout_s / 2)
  mesh = make_mesh(config.mesh)
  use_compilation_cache(config.compilation_cache_dir)
  return mesh


def _detected_cluster() -> str | None:
  """A launcher that JAX's jax.distributed.initialize() can read on its own, if any."""
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
    return "SLURM"
  if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return "Open MPI"
  return None


def initialize_distributed(dc) -> None:
  """Joins a multi-process run when config.distributed asks, or on a detected cluster.

  Must run before anything touches the JAX backend. TPU pods need nothing here: the TPU
  runtime connects the hosts itself. JAX aborts the process (no exception) when the
  coordinator cannot be reached in time, so a watchdog turns that into a one-line error first.
  """
  if jax.distributed.is_initialized():
    return
  if dc.coordinator_address:
    missing = [k for k in ("num_processes", "process_id") if dc[k] is None]
    if missing:
      raise UserError(
        f"config.distributed.coordinator_address is set but "
        f"{', '.join('config.distributed.' + k for k in missing)} is not; pass "
        "all three (the same address and count on every process)"
      )
    if not 0 <= dc.process_id < dc.num_processes:
      raise UserError(
        f"config.distributed.process_id={dc.process_id} must be in "
        f"[0, num_processes={dc.num_processes})"
      )
    kwargs = dict(
      coordinator_address=dc.coordinator_address,
      num_processes=dc.num_processes,
      process_id=dc.process_id,
    )
    where = f"the coordinator at {dc.coordinator_address}"
  elif dc.auto and (cluster := _detected_cluster()):
    kwargs, where = {}, f"the {cluster} job's coordinator"
  else:
    return
  if dc.timeout_s <= 0:
    raise UserError(f"config.distributed.timeout_s={dc.timeout_s} must be above 0")

  def give_up():
    role = (
      "waiting for all processes to join"
      if kwargs.get("process_id") == 0
      else "could not reach " + where
    )
    print(
      f"gptjax: error: {role} within {dc.timeout_s}s; start every process with the same "
      "coordinator_address and num_processes (process 0 on that host), check the port is "
      "open, or raise --config.distributed.timeout_s",
      file=sys.stderr,
      flush=True,
    )
    os._exit(1)

  try:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU multi-process
  except Exception:  # the option may be gone in a later JAX; gloo is its default
    pass
  if dc.heartbeat_timeout_s <= 0:
    raise UserError(
      f"config.distributed.heartbeat_timeout_s={dc.heartbeat_timeout_s} must be above 0"
    )
  watchdog = threading.Timer(dc.timeout_s, give_up)
  watchdog.daemon = True
  watchdog.start()
  try:
    # JAX's own deadline is later: our watchdog fires first with a readable message.
    jax.distributed.initialize(
      **kwargs,
      initialization_timeout=int(dc.timeout_s) + 30,
      heartbeat_timeout_seconds=int(dc.heartbeat_timeout_s),
    )
  except (RuntimeError, ValueError) as e:  # a malformed address, a port already taken, ...
    raise UserError(
      f"cannot join {where}: {' '.join(str(e).split())[:200]}; check "
      "config.distributed.coordinator_address (host:port)"
    ) from None
  finally:
    watchdog.cancel()


# --- A process of a multi-process run dies ------------------------------------------------

# What rerunning does (the training loop sets it to name its newest checkpoint).
resume_hint = lambda: (
  "rerunning the same command on every process resumes from the newest checkpoint"
)  # noqa: E731


def exit_lost_peer(who: str, reason: str) -> None:
  """One line naming the lost process, then exit at once: JAX's own exit would wait for the
  dead peer (its heartbeat timeout) and abort with a stack dump, and no checkpoint can be
  saved without every process."""
  me, n = jax.process_index(), jax.process_count()
  print(
    f"gptjax: error: process {me}: {who} of this {n}-process run stopped responding "
    f"({reason}); this process stops too; {resume_hint()}",
    file=sys.stderr,
    flush=True,
  )
  sys.stdout.flush()
  os._exit(1)


def watch_peers(timeout_s: float) -> None:
  """A daemon thread per process: bump a counter in JAX's key-value store, and exit with
  exit_lost_peer when the next process's counter (in a ring: O(1) reads per process, for
  pods of any size) stands still for timeout_s.

  A peer that dies inside a barrier (a checkpoint save) is otherwise found only by JAX's
  heartbeat timeout, whose handler aborts every process with a stack dump; this fires at
  half that timeout, first. (A coordinator that dies is still JAX's to report: its client
  aborts at once.)
  """
  from jax._src import distributed

  client, me, n = distributed.global_state.client, jax.process_index(), jax.process_count()
  if client is None or n < 2:
    return
  interval = max(timeout_s / 10, 0.2)

  def run():
    peer, beat, last, since = (me + 1) % n, 0, None, time.monotonic()
    while True:
      beat += 1
      try:
        client.key_value_set(f"gptjax/alive/{me}", str(beat), allow_overwrite=True)
        try:
          value = client.key_value_try_get(f"gptjax/alive/{peer}")
        except Exception:  # not started yet (one that never starts is JAX's to find)
          value = None
      except Exception:  # the coordinator is gone: JAX's client reports that itself
        return
      now = time.monotonic()
      if value != last:
        last, since = value, now
      elif value is not None and now - since > timeout_s:
        exit_lost_peer(f"process {peer}", f"no sign of life for {timeout_s:.0f}s")
      time.sleep(interval)

  threading.Thread(target=run, name="gptjax-peer-watch", daemon=True).start()

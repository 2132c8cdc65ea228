"""Process start-up and the process's life: XLA flags, jax.distributed, the compile cache, a
watch on the other processes, and preemption signals.

`start(config)` runs them in the order JAX needs (flags before the backend starts, the
processes joined before any device is touched, the cache before compiling) and returns the
mesh (gptjax/sharding.py owns meshes, rules and shardings; this module owns the process).
"""

import contextlib
import importlib.util
import os
import re
import signal
import sys
import threading
import time

import jax
import jaxlib.version

from gptjax import sharding
from gptjax.errors import UserError, describe
from gptjax.storage import ensure_writable_dir

# --- XLA flags -------------------------------------------------------------------------

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


def start(config) -> jax.sharding.Mesh:
  """XLA flags, the processes of a multi-host job, the mesh and the compilation cache, in the
  order JAX needs them (flags before the backend starts, the cache before compiling)."""
  set_xla_flags(
    cpu_device_count(config.cpu_devices, config.train.batch_size // config.optim.grad_accum)
  )
  initialize_distributed(config.distributed)
  watch_peers(config.distributed.heartbeat_timeout_s / 2)
  mesh = sharding.make_mesh(config.mesh)
  use_compilation_cache(config.compilation_cache_dir)
  return mesh


def _detected_cluster() -> str | None:
  """A launcher that JAX's jax.distributed.initialize() can read on its own, if any."""
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
    return "SLURM"
  if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return "Open MPI"
  return None


def initialize_distributed(settings) -> None:
  """Joins a multi-process run when config.distributed (`settings`) asks, or on a detected
  cluster.

  Must run before anything touches the JAX backend. TPU pods need nothing here: the TPU
  runtime connects the hosts itself. JAX aborts the process (no exception) when the
  coordinator cannot be reached in time, so a watchdog turns that into a one-line error first.
  """
  if jax.distributed.is_initialized():
    return
  if settings.coordinator_address:  # validate() has checked the three go together
    kwargs = dict(
      coordinator_address=settings.coordinator_address,
      num_processes=settings.num_processes,
      process_id=settings.process_id,
    )
    where = f"the coordinator at {settings.coordinator_address}"
  elif settings.auto and (cluster := _detected_cluster()):
    kwargs, where = {}, f"the {cluster} job's coordinator"
  else:
    return

  def give_up():
    role = (
      "waiting for all processes to join"
      if kwargs.get("process_id") == 0
      else "could not reach " + where
    )
    print(
      f"gptjax: error: {role} within {settings.timeout_s}s; start every process with the same "
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
  watchdog = threading.Timer(settings.timeout_s, give_up)
  watchdog.daemon = True
  watchdog.start()
  try:
    # JAX's own deadline is later: our watchdog fires first with a readable message.
    jax.distributed.initialize(
      **kwargs,
      initialization_timeout=int(settings.timeout_s) + 30,
      heartbeat_timeout_seconds=int(settings.heartbeat_timeout_s),
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


_PEER_FAILURES = (
  "Gloo",
  "Barrier failed",
  "heartbeat",
  "Connection reset",
  "UNAVAILABLE",
  "NCCL",
  "DEADLINE_EXCEEDED",
)


def exit_if_peer_lost(e: Exception) -> None:
  """In a multi-process run, an error of a collective or a barrier means a peer died or was
  stopped: name it in one line and exit (exit_lost_peer)."""
  if jax.process_count() < 2 or isinstance(e, UserError):
    return
  text = " ".join(str(e).split())
  if "RESOURCE_EXHAUSTED" in text or not (
    isinstance(e, jax.errors.JaxRuntimeError) or any(m in text for m in _PEER_FAILURES)
  ):
    return
  n, me = jax.process_count(), jax.process_index()
  exit_lost_peer(
    f"process {1 - me}" if n == 2 else "another process",
    describe(RuntimeError(text.split("Error dispatching computation: ")[-1])),
  )


def watch_peers(timeout_s: float) -> None:
  """A daemon thread per process: bump a counter in JAX's key-value store, and exit with
  exit_lost_peer when the next process's counter (in a ring: O(1) reads per process, for
  pods of any size) stands still for timeout_s.

  A peer that dies inside a barrier (a checkpoint save) is otherwise found only by JAX's
  heartbeat timeout, whose handler aborts every process with a stack dump; this fires at
  half that timeout, first. (A coordinator that dies is still JAX's to report: its client
  aborts at once.)
  """
  me, n = jax.process_index(), jax.process_count()
  if n < 2:
    return
  try:  # JAX's distributed client has no public handle; without it, JAX's own timeout rules
    from jax._src import distributed

    client = distributed.global_state.client
  except (ImportError, AttributeError) as e:
    print(f"warning: no peer watch ({e}); a dead process is found by JAX's heartbeat", flush=True)
    return
  if client is None:
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


# --- Preemption: SIGTERM / SIGINT -----------------------------------------------------


@contextlib.contextmanager
def interrupt_kills():
  """Ctrl-C ends the process at once inside (the OS default) instead of raising
  KeyboardInterrupt when Python next runs, which during a long XLA compile is minutes
  later. For start-up only: nothing has been trained yet, so there is nothing to save."""
  try:
    previous = signal.signal(signal.SIGINT, signal.SIG_DFL)
  except ValueError:  # not the main thread: signals stay as they were
    yield
    return
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, previous)


class InFlight:
  """Bounds the dispatched steps not yet waited for, so that a signal is acted on soon.

  Fast steps keep two in flight (the host prepares the next batch meanwhile). Steps over a
  second keep none: Ctrl-C or SIGTERM then waits for the running step alone, not three. The
  first step is waited for, which measures it.
  """

  def __init__(self):
    self.pending, self.ahead = [], 0

  def add(self, result) -> None:
    """result: an array the step returned (its loss)."""
    self.pending.append(result)
    if len(self.pending) > self.ahead:
      waited = time.perf_counter()
      self.pending.pop(0).block_until_ready()
      self.ahead = 2 if time.perf_counter() - waited < 1.0 else 0
      while len(self.pending) > self.ahead:
        self.pending.pop(0).block_until_ready()


class PreemptionWatch:
  """SIGTERM/SIGINT -> `reached(step)` turns true, so the loop saves that step and stops.

  On several hosts JAX's preemption notifier owns SIGTERM, and `reached` is JAX's sync point:
  every process returns true at the same step, so all of them save the same checkpoint.
  """

  def __init__(self):
    self.received = None
    self._multi = jax.process_count() > 1
    self._no_sync = False
    self._previous = {}
    if not self._multi:  # a signal to one host of several would stop only that one
      for sig in (signal.SIGTERM, signal.SIGINT):
        try:
          self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: signals stay as they were
          pass

  def _handle(self, signum, frame):
    if self.received == signal.Signals(signum).name and time.monotonic() - self._at < 1.0:
      return  # one signal delivered twice (to the cgroup, and passed on by gptjax.sweep)
    if self.received:  # a second signal: the step may hang, so stop the usual way
      self.close()
      os.kill(os.getpid(), signum)
      return
    self.received, self._at = signal.Signals(signum).name, time.monotonic()

  def pending(self) -> str | None:
    """The signal's name as soon as one arrived (one host only: several hosts must agree on
    where to stop, so they only stop at reached()'s sync points)."""
    return None if self._multi else self.received

  def reached(self, step: int) -> str | None:
    """The signal's name if the loop should save at `step` and stop, else None."""
    if self._multi and not self._no_sync:
      from jax.experimental import multihost_utils

      try:
        if multihost_utils.reached_preemption_sync_point(step):
          self.received = "SIGTERM"
      except RuntimeError as e:  # no preemption service (e.g. a pod started without it)
        self._no_sync = True
        print(
          f"warning: preemption sync unavailable ({e}); SIGTERM will not save first", flush=True
        )
    return self.received

  def close(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

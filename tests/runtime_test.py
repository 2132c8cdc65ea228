"""Process start-up: XLA flags, CPU device counts, the compilation cache."""

import os
import signal
import time

import jax
import pytest

from gptjax import runtime


def test_xla_flags_are_added_unless_the_user_set_them(monkeypatch):
  import jaxlib.version

  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  cpu = (
    ["--xla_cpu_experimental_ynn_fusion_type=dot"]
    if jaxlib.version.__version__.startswith("0.10.")
    else []
  )
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  runtime.set_xla_flags(cpu_devices=2)  # the user's device count wins; no CPU flag for 8
  assert os.environ["XLA_FLAGS"].split() == [
    "--xla_force_host_platform_device_count=8",
    "--xla_gpu_enable_latency_hiding_scheduler=true",
  ]
  monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_latency_hiding_scheduler=false")
  runtime.set_xla_flags(cpu_devices=1)  # one device is XLA's default: no count added
  assert os.environ["XLA_FLAGS"].split() == [
    "--xla_gpu_enable_latency_hiding_scheduler=false",
    *cpu,
  ]
  monkeypatch.setenv("XLA_FLAGS", "")
  runtime.set_xla_flags(cpu_devices=2)
  assert os.environ["XLA_FLAGS"].split() == [
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_force_host_platform_device_count=2",
  ]
  monkeypatch.setenv("JAX_PLATFORMS", "cuda")  # no CPU flags where JAX runs on a GPU
  monkeypatch.setenv("XLA_FLAGS", "")
  runtime.set_xla_flags(cpu_devices=2)
  assert os.environ["XLA_FLAGS"] == "--xla_gpu_enable_latency_hiding_scheduler=true"


@pytest.mark.parametrize(
  "requested, cores, batch, devices",
  [(-1, 2, 12, 2), (-1, 16, 12, 12), (-1, 5, 12, 4), (-1, 8, 7, 7), (3, 2, 12, 3), (1, 2, 12, 1)],
)
def test_cpu_devices_one_per_core_dividing_the_batch(monkeypatch, requested, cores, batch, devices):
  monkeypatch.setattr(os, "cpu_count", lambda: cores)
  assert runtime.cpu_device_count(requested, batch) == devices


def test_an_unwritable_compilation_cache_is_a_warning_not_a_failure(capsys):
  before = jax.config.jax_compilation_cache_dir
  runtime.use_compilation_cache("/proc/no_cache_here")
  assert "warning: no compilation cache" in capsys.readouterr().out
  assert jax.config.jax_compilation_cache_dir == before


def test_in_flight_runs_ahead_only_of_fast_steps():
  """Two steps in flight while steps are fast; none once a step takes over a second (a
  signal then waits for the running step alone)."""

  class Step:
    def __init__(self, seconds, waited):
      self.seconds, self.waited = seconds, waited

    def block_until_ready(self):
      time.sleep(self.seconds)
      self.waited.append(self)

  waited, bound = [], runtime.InFlight()
  first = Step(0, waited)
  bound.add(first)
  assert waited == [first] and bound.ahead == 2  # the first step is measured
  fast = [Step(0, waited) for _ in range(3)]
  for step in fast:
    bound.add(step)
  assert waited == [first, fast[0]] and len(bound.pending) == 2
  slow = Step(1.1, waited)
  bound.add(slow)  # waits for fast[1], which is quick: still two ahead
  bound.add(Step(0, waited))  # waits for fast[2]
  bound.add(Step(0, waited))  # waits for the slow one: from now on none ahead
  assert bound.ahead == 0 and not bound.pending  # the two after it were waited for too
  last = Step(0, waited)
  bound.add(last)
  assert waited[-1] is last and not bound.pending


def test_one_signal_delivered_twice_stops_the_run_once():
  """A cgroup-wide SIGTERM reaches a sweep's variant directly and again through the sweep:
  taken as a second signal, it killed the run before its save."""
  watch = runtime.PreemptionWatch()
  try:
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)  # within the second: the same one
    assert watch.reached(1) == "SIGTERM"
  finally:
    watch.close()

"""int8 weight products on a CPU: a small C++ kernel (kernels/int8_matmul.cc) called through
XLA's FFI, for decoding.

XLA's CPU backend lowers x @ int8 by writing a float32 copy of the whole kernel first, so
int8 weights were slower than float32 there (BUILD_NOTES.md, "int8 inference"). The kernel
widens each int8 weight in registers instead, so a decoding step reads one byte per weight.
It is built on first use with the system's C++ compiler (`$CXX`, else `c++`), for this CPU
(-march=native), into ~/.cache/gptjax/kernels (or $GPTJAX_KERNEL_CACHE), keyed by the
source, jaxlib and the CPU's flags. Without a compiler gptjax prints one warning and uses
XLA's lowering: the same products up to float rounding (the kernel accumulates in float32
and rounds once, also under bf16 compute), slower.

Used for at most MAX_ROWS rows of activations on the CPU backend without a multi-device
mesh; anything else is XLA's dot. A custom call cannot be split by XLA's partitioner, and
the mesh is read from the tracing context (`jax.set_mesh`, as gptjax's sharding.context
sets it): params sharded over several devices must be run under it, or XLA gathers each
weight to every device on each call (correct, slow).
"""

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import uuid

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

MAX_ROWS = 64  # measured: at 64 rows the kernel still matches XLA's float32 GEMM
SOURCE = os.path.join(os.path.dirname(__file__), "kernels", "int8_matmul.cc")
TARGETS = {"kn": "GptjaxInt8MatmulKn", "nk": "GptjaxInt8MatmulNk"}
FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC"]


def _cpu_flags() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      return next((line for line in f if line.startswith(("flags", "Features"))), "")
  except OSError:
    return platform.processor()


def _cache_dir() -> str:
  default = os.path.join("~", ".cache", "gptjax", "kernels")
  return os.path.expanduser(os.environ.get("GPTJAX_KERNEL_CACHE", default))


def _build() -> str:
  """The shared library's path, compiling it unless this CPU's build is cached."""
  compiler = shlex.split(os.environ.get("CXX", "c++")) or ["c++"]  # e.g. "ccache g++"
  with open(SOURCE, "rb") as f:
    source = f.read()
  key = hashlib.sha256(
    b"\0".join(
      [source, jaxlib.__version__.encode(), " ".join(compiler).encode(), " ".join(FLAGS).encode()]
      + [platform.machine().encode(), _cpu_flags().encode()]
    )
  ).hexdigest()[:16]
  path = os.path.join(_cache_dir(), f"int8_matmul-{key}.so")
  if os.path.exists(path):
    return path
  if shutil.which(compiler[0]) is None:
    raise RuntimeError(f"no C++ compiler {compiler[0]!r} on PATH (set $CXX)")
  os.makedirs(_cache_dir(), exist_ok=True)
  tmp = f"{path}.{uuid.uuid4().hex}.tmp"  # concurrent builds each rename a whole file
  with tempfile.TemporaryDirectory() as scratch:
    try:
      out = subprocess.run(
        [*compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", SOURCE, "-o", tmp],
        capture_output=True,
        text=True,
        cwd=scratch,
        timeout=300,
      )
    except subprocess.TimeoutExpired:
      out = subprocess.CompletedProcess([], -1, "", "timed out after 300 s")
  if out.returncode != 0:
    if os.path.exists(tmp):
      os.remove(tmp)
    lines = [line for line in out.stderr.splitlines() if "error" in line] or [out.stderr]
    detail = lines[0].strip()[:200] or f"exit status {out.returncode}"
    raise RuntimeError(f"{' '.join(compiler)} failed: {detail}")
  os.replace(tmp, path)
  return path


@functools.cache
def available() -> bool:
  """Builds and registers the kernel once per process; False (with one warning) if it cannot."""
  try:
    lib = ctypes.cdll.LoadLibrary(_build())
    for name, symbol in TARGETS.items():
      capsule = jax.ffi.pycapsule(getattr(lib, symbol))
      jax.ffi.register_ffi_target(f"gptjax_int8_{name}", capsule, platform="cpu")
  except (OSError, RuntimeError, AttributeError) as e:  # AttributeError: a symbol missing
    print(
      f"gptjax: warning: the int8 CPU kernel is unavailable ({e}); int8 products use "
      "XLA's lowering (the same up to rounding, slower)",
      file=sys.stderr,
    )
    return False
  return True


def _multi_device_mesh() -> bool:
  mesh = jax.sharding.get_abstract_mesh()
  return not mesh.empty and mesh.size > 1


def matmul(x, w, scale, layout: str, n_in: int, dtype):
  """x (..., K in n_in trailing dims) times int8 w, times scale (the output's float32 scale
  per channel), in dtype. layout "kn": w is (K dims..., N dims...), a projection kernel;
  "nk": w is (N, K), an embedding table used as the output head."""
  k_dims = x.shape[x.ndim - n_in :]
  lead = x.shape[: x.ndim - n_in]
  out_dims = w.shape[n_in:] if layout == "kn" else w.shape[:1]

  def xla(x, w, scale):
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)) if layout == "kn" else (1,))
    y = jax.lax.dot_general(x.astype(dtype), w.astype(dtype), (contract, ((), ())))
    return y * scale.reshape((1,) * (y.ndim - scale.ndim) + scale.shape).astype(y.dtype)

  rows = int(np.prod(lead, dtype=np.int64))
  on_cpu = jax.default_backend() == "cpu"  # a GPU or TPU never builds the kernel
  if rows > MAX_ROWS or not on_cpu or _multi_device_mesh() or not available():
    return xla(x, w, scale)

  def cpu(x, w, scale):
    k, n = int(np.prod(k_dims)), int(np.prod(out_dims))
    w2 = w.reshape((k, n) if layout == "kn" else (n, k))  # row-major: free
    call = jax.ffi.ffi_call(f"gptjax_int8_{layout}", jax.ShapeDtypeStruct((rows, n), jnp.float32))
    y = call(x.reshape(rows, k).astype(jnp.float32), w2, scale.reshape(n).astype(jnp.float32))
    return y.reshape(*lead, *out_dims).astype(dtype)

  return jax.lax.platform_dependent(x, w, scale, cpu=cpu, default=xla)

"""The int8 CPU kernel: its products equal the dequantized float product for every shape
gptjax gives it, the model calls it only where it should, and without a compiler gptjax
says so once and computes the same numbers with XLA."""

import os
import platform
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ONE_DEVICE, REPO, tiny_config

from gptjax import int8_kernel, sharding
from gptjax.layers import quantize
from gptjax.model import GPT, GPTConfig


def _reference(x, q, scale, layout, n_in):
  """float64 x @ (q * scale), contracting x's last n_in dims."""
  x64, w64 = np.asarray(x, np.float64), np.asarray(q, np.float64)
  if layout == "nk":
    return np.einsum("...k,nk->...n", x64, w64) * np.asarray(scale, np.float64)
  k = int(np.prod(x.shape[x.ndim - n_in :]))
  y = x64.reshape(-1, k) @ w64.reshape(k, -1)
  return (y * np.asarray(scale, np.float64).reshape(-1)).reshape(
    *x.shape[: x.ndim - n_in], *q.shape[n_in:]
  )


@pytest.mark.parametrize(
  "lead, w_shape, layout, n_in",
  [
    ((1,), (64, 192), "kn", 1),  # one row: decoding at batch 1
    ((3, 1), (40, 130), "kn", 1),  # K not a multiple of 16, N not of 64 (a ragged end)
    ((9,), (33, 64), "kn", 1),  # more rows than one pass takes (4)
    ((1,), (40, 600), "kn", 1),  # 256-column blocks (one row), then 64, then single columns
    ((2, 1), (40, 600), "kn", 1),  # 128-column blocks (two rows)
    ((3,), (24, 600), "kn", 1),  # 64-column blocks (three rows)
    ((2, 1), (4, 8, 48), "kn", 2),  # attention's out kernel (N, H, D): two dims contracted
    ((1,), (48, 3, 4, 8), "kn", 1),  # the qkv kernel (D, 3, N, H): several output dims
    ((5,), (67, 40), "nk", 1),  # the output head: a (V, D) table, V not a multiple of 4
    ((2, 3), (130, 35), "nk", 1),  # D not a multiple of 16
    ((int8_kernel.MAX_ROWS,), (50, 70), "kn", 1),  # the largest call the kernel takes
  ],
)
def test_the_kernel_equals_the_dequantized_product(lead, w_shape, layout, n_in):
  assert int8_kernel.available()
  kx, kw = jax.random.split(jax.random.PRNGKey(0))
  k_dims = w_shape[:n_in] if layout == "kn" else w_shape[1:]
  x = jax.random.normal(kx, (*lead, *k_dims), jnp.float32)
  axes = tuple(range(n_in)) if layout == "kn" else (1,)
  q, scale = quantize(jax.random.normal(kw, w_shape), axes)
  f = jax.jit(lambda x, q, s: int8_kernel.matmul(x, q, s, layout, n_in, jnp.float32))
  assert "gptjax_int8_" in f.lower(x, q, scale).as_text()  # the kernel, not XLA's dot
  want = _reference(x, q, scale, layout, n_in)
  np.testing.assert_allclose(np.asarray(f(x, q, scale)), want, rtol=1e-5, atol=1e-5)


def _int8_model():
  config = tiny_config(model__vocab_size=65, model__quant="int8")
  model = GPT(GPTConfig.from_config(config.model, 65))
  boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
  params = jax.tree.map(lambda x: jnp.ones(x.shape, x.dtype), nn.meta.unbox(boxed["params"]))
  return config, model, boxed, params


def test_the_model_calls_it_for_decoding_and_xla_for_long_inputs():
  """Each int8 product of a short input (every projection and the head) is one kernel call
  and no float copy of an int8 weight is made; a long input (a prefill of many rows) is
  XLA's dot, which is faster there."""
  _, model, _, params = _int8_model()
  hlo = lambda t: jax.jit(model.apply).lower({"params": params}, t).compile().as_text()
  short = hlo(jnp.zeros((1, 4), jnp.int32))
  kernels = [p for p, _ in jax.tree_util.tree_leaves_with_path(params) if p[-1].key == "kernel"]
  assert short.count('custom_call_target="gptjax_int8_') == len(kernels) + 1  # + the tied head
  assert "f32[32,96]" not in short.replace("s8[32,96]", "")  # the qkv kernel stays int8
  long = hlo(jnp.zeros((2, int8_kernel.MAX_ROWS), jnp.int32))
  assert "gptjax_int8_" not in long


def test_a_multi_device_mesh_uses_xla():
  """A custom call cannot be split by XLA's partitioner: under a mesh of several devices the
  int8 model's products stay XLA's, and give the same logits."""
  config, model, boxed, params = _int8_model()
  config.mesh.shape.update(dict(data=1, fsdp=4, tensor=2))
  mesh, rules = sharding.make_mesh(config.mesh), sharding.rules(config.mesh)
  params = jax.tree.map(lambda x: x * 3 if x.dtype == jnp.int8 else x, params)
  params = jax.device_put(params, sharding.tree_shardings(boxed["params"], mesh, rules))
  tokens = jnp.arange(8, dtype=jnp.int32).reshape(2, 4) % 65
  apply = jax.jit(model.apply)
  with sharding.context(mesh, rules):
    split_hlo = apply.lower({"params": params}, tokens).as_text()
    split = apply({"params": params}, tokens)
  local = jax.device_put(params, jax.devices()[0])
  assert "gptjax_int8_" not in split_hlo
  assert "gptjax_int8_" in apply.lower({"params": local}, tokens).as_text()
  np.testing.assert_allclose(split, apply({"params": local}, tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # a build or a subprocess
def test_without_a_compiler_it_says_so_once_and_computes_with_xla(tmp_path):
  script = (
    "import jax, jax.numpy as jnp, numpy as np\n"
    "from gptjax import int8_kernel\n"
    "x = jnp.ones((1, 32)); q = jnp.ones((32, 8), jnp.int8); s = jnp.full((8,), 0.5)\n"
    "for _ in range(2):\n"
    "  y = jax.jit(lambda x: int8_kernel.matmul(x, q, s, 'kn', 1, jnp.float32))(x)\n"
    "print(np.asarray(y).tolist())\n"
  )
  env = dict(os.environ, **ONE_DEVICE, CXX="no-such-compiler", GPTJAX_KERNEL_CACHE=str(tmp_path))
  proc = subprocess.run(
    [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True
  )
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() == str([[16.0] * 8])
  warnings = [line for line in proc.stderr.splitlines() if "int8 CPU kernel" in line]
  assert len(warnings) == 1 and "no-such-compiler" in warnings[0], proc.stderr
  assert os.listdir(tmp_path) == []  # nothing half-built left behind


@pytest.mark.slow  # a build or a subprocess
def test_a_build_is_cached_and_a_failed_build_leaves_nothing(tmp_path, monkeypatch):
  monkeypatch.setenv("GPTJAX_KERNEL_CACHE", str(tmp_path))
  path = int8_kernel._build()
  assert os.listdir(tmp_path) == [os.path.basename(path)]
  mtime = os.path.getmtime(path)
  assert int8_kernel._build() == path and os.path.getmtime(path) == mtime  # not rebuilt
  broken = tmp_path.parent / f"{tmp_path.name}-broken.cc"
  broken.write_text("this is not C++\n")
  monkeypatch.setattr(int8_kernel, "SOURCE", str(broken))
  with pytest.raises(RuntimeError, match="failed"):
    int8_kernel._build()
  assert os.listdir(tmp_path) == [os.path.basename(path)]


@pytest.mark.slow  # two builds, each in a subprocess
@pytest.mark.parametrize(
  "extra", [["-mno-avx512f"], ["-mno-avx512f", "-mno-avx2", "-mno-avx"]], ids=["avx2", "plain"]
)
def test_the_builds_for_older_cpus_give_the_same_products(extra, tmp_path):
  """This machine builds the AVX-512 path; a CPU with AVX2 only, or neither, gets the other
  code paths (fewer rows and columns per pass): built here with those flags, same results."""
  if platform.machine() not in ("x86_64", "AMD64"):
    pytest.skip("x86 flags")
  script = (
    "import jax, jax.numpy as jnp, numpy as np\n"
    "from gptjax import int8_kernel\n"
    f"int8_kernel.FLAGS = [*int8_kernel.FLAGS, *{extra!r}]\n"
    "assert int8_kernel.available()\n"
    "worst = 0.0\n"
    "for m, k, n, layout in ((1, 40, 600, 'kn'), (3, 24, 600, 'kn'), (5, 67, 43, 'nk')):\n"
    "  r = np.random.default_rng(m)\n"
    "  x = jnp.asarray(r.standard_normal((m, k)), jnp.float32)\n"
    "  q = jnp.asarray(r.integers(-127, 128, (k, n) if layout == 'kn' else (n, k)), jnp.int8)\n"
    "  s = jnp.asarray(r.random(n), jnp.float32)\n"
    "  f = jax.jit(lambda x, q, s: int8_kernel.matmul(x, q, s, layout, 1, jnp.float32))\n"
    "  w = np.asarray(q, np.float64) if layout == 'kn' else np.asarray(q, np.float64).T\n"
    "  want = np.asarray(x, np.float64) @ w * np.asarray(s, np.float64)\n"
    "  assert 'gptjax_int8_' in f.lower(x, q, s).as_text()\n"
    "  worst = max(worst, float(np.max(np.abs(np.asarray(f(x, q, s)) - want))))\n"
    "print(worst)\n"
  )
  env = dict(os.environ, **ONE_DEVICE, GPTJAX_KERNEL_CACHE=str(tmp_path))
  proc = subprocess.run(
    [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert float(proc.stdout) < 1e-3, proc.stdout  # products of ~100: float32 rounding

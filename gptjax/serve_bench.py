"""Load for `python -m gptjax.bench serve`: a gptjax.serve process on 127.0.0.1 and clients
streaming completions from it, closed loop (N clients, each sending its next request when
the last one ends) or open loop (Poisson arrivals at a given rate). Every loop is bounded
in requests and in time.

Measured per request: time to first token (the first streamed text), time per output token
after it, and its tokens (the stream's usage); over the run: requests/s and output
tokens/s, and the programs the server compiled while under load (it should be none).
"""

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time

import flax.linen as nn
import httpx
import jax
import numpy as np

from gptjax import config as config_lib
from gptjax import inference
from gptjax.errors import UserError
from gptjax.model import GPT, GPTConfig, init_params


class Ids:
  """The 'tokenizer' of random weights (benchmarks): text is the token ids."""

  def __init__(self, vocab_size: int):
    self.vocab_size, self.eot_id = vocab_size, -1  # no end of text: every reply runs its budget

  def encode(self, text: str) -> np.ndarray:
    return np.array([int(t) for t in text.split()], np.int32)

  def decode(self, ids) -> str:
    return "".join(f" {int(i)}" for i in ids)


def random_weights(config) -> inference.Loaded:
  config_lib.validate(config)
  vocab = config.model.vocab_size or config_lib.fixed_vocab_size(config)
  if not vocab:
    raise UserError(
      "--random_weights needs --config.model.vocab_size=N (the tokenizer is not read)"
    )
  model = GPT(GPTConfig.from_config(config.model, vocab))
  init = jax.jit(lambda key: nn.meta.unbox(init_params(model, key)))
  return inference.Loaded(
    model, init(jax.random.PRNGKey(config.seed)), Ids(vocab), "random", config
  )


def start_server(args: list[str], timeout: float = 600) -> tuple[subprocess.Popen, str]:
  """`python -m gptjax.serve ARGS --port=FREE` started and healthy -> (process, url)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  proc = subprocess.Popen(
    [sys.executable, "-m", "gptjax.serve", *args, f"--port={port}"],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  url, deadline = f"http://127.0.0.1:{port}", time.time() + timeout
  while True:
    if proc.poll() is not None:
      raise UserError(f"the server did not start: {proc.communicate()[1].strip()[-500:]}")
    if time.time() > deadline:
      proc.kill()
      raise UserError(f"the server was not up within {timeout:.0f}s")
    try:
      if httpx.get(f"{url}/health").status_code == 200:
        return proc, url
    except httpx.TransportError:
      time.sleep(0.25)


def stop_server(proc: subprocess.Popen) -> int:
  proc.send_signal(signal.SIGTERM)
  try:
    return proc.wait(timeout=60)
  except subprocess.TimeoutExpired:
    proc.kill()
    return proc.wait()


async def _one(client: httpx.AsyncClient, url: str, body: dict) -> dict:
  t0 = time.perf_counter()
  first = last = None
  tokens = 0
  async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
    if r.status_code != 200:
      return {"status": r.status_code}
    async for line in r.aiter_lines():
      if not line.startswith("data: ") or line == "data: [DONE]":
        continue
      chunk = json.loads(line[len("data: ") :])
      now = time.perf_counter()
      if chunk.get("choices") and chunk["choices"][0].get("text"):
        first = first or now
        last = now
      if chunk.get("usage"):
        tokens = chunk["usage"]["completion_tokens"]
  first, last = first or time.perf_counter(), last or time.perf_counter()
  return {
    "status": 200,
    "ttft_s": first - t0,
    "tpot_s": (last - first) / max(tokens - 1, 1),
    "tokens": tokens,
  }


async def _load(url, body, clients: int, requests: int, rate: float | None, limit_s: float):
  """Closed loop (rate None): `clients` workers share `requests`. Open loop: `requests`
  Poisson arrivals at `rate` per second. Stops starting requests after limit_s."""
  results, started, t0 = [], 0, time.perf_counter()
  limits = httpx.Limits(max_connections=max(clients, 1) + 64)
  async with httpx.AsyncClient(timeout=limit_s + 60, limits=limits) as client:

    async def worker():
      nonlocal started
      while started < requests and time.perf_counter() - t0 < limit_s:
        started += 1
        results.append(await _one(client, url, body))

    if rate is None:
      await asyncio.gather(*(worker() for _ in range(clients)))
    else:
      gaps = np.random.default_rng(0).exponential(1 / rate, requests)
      tasks = []
      for gap in gaps:
        await asyncio.sleep(gap)
        if time.perf_counter() - t0 >= limit_s:
          break
        tasks.append(asyncio.create_task(_one(client, url, body)))
      results = list(await asyncio.gather(*tasks))
  return results, time.perf_counter() - t0


def measure(url: str, body: dict, clients: int, requests: int, rate=None, limit_s=300.0) -> dict:
  """Runs one load against url; the figures as a dict."""
  compiles = httpx.get(f"{url}/health").json()["compiles"]
  results, wall_s = asyncio.run(_load(url, body, clients, requests, rate, limit_s))
  done = [r for r in results if r["status"] == 200]
  if not done:
    raise UserError(f"no request succeeded ({[r['status'] for r in results][:5]} ...)")
  ttft = np.array([r["ttft_s"] for r in done]) * 1e3
  tpot = np.array([r["tpot_s"] for r in done if r["tokens"] > 1]) * 1e3
  tokens = sum(r["tokens"] for r in done)
  return {
    "load": "closed" if rate is None else f"poisson {rate}/s",
    "clients": clients if rate is None else None,
    "requests": len(results),
    "rejected": len(results) - len(done),
    "wall_s": round(wall_s, 2),
    "requests_per_s": round(len(done) / wall_s, 2),
    "output_tokens_per_s": round(tokens / wall_s, 1),
    "ttft_ms_p50": round(float(np.percentile(ttft, 50)), 1),
    "ttft_ms_p99": round(float(np.percentile(ttft, 99)), 1),
    "tpot_ms_p50": round(float(np.percentile(tpot, 50)), 2) if len(tpot) else None,
    "compiles_under_load": httpx.get(f"{url}/health").json()["compiles"] - compiles,
  }

"""An OpenAI-compatible HTTP server: `python -m gptjax.serve --workdir=DIR [--port=8000]`.

Loads what `--mode=sample` loads (a run's newest checkpoint or export, or `--config=...
--config.init_from=hf:DIR`), with the run's tokenizer and chat template, and serves

  POST /v1/completions        prompt (text, or token ids), max_tokens, temperature, top_p,
                              top_k, stop, seed, n, stream, logprobs, echo (echo + logprobs +
                              max_tokens=0 scores the prompt: lm-eval's loglikelihood)
  POST /v1/chat/completions   messages rendered by the run's chat template; logprobs,
                              top_logprobs, max_completion_tokens
  GET  /v1/models[/ID], GET /health

from one engine thread doing continuous batching (scheduler.py, engine.py); openai_api.py
holds the request and answer shapes. Streaming is server-sent events ending with
`data: [DONE]`. A full queue answers 429, another model's name 404, a prompt beyond the
context 400 with the numbers, a bad field (or one we cannot honour) 400 naming it; SIGTERM
stops admitting, finishes what runs and exits 0.
"""

import asyncio
import signal
import sys
import uuid

import fastapi
import numpy as np
import pydantic
import starlette.exceptions
import uvicorn
from absl import flags
from fastapi import responses
from ml_collections import config_flags

from gptjax import (
  chat_template,
  cli,
  inference,
  quantize,
  runtime,
  scheduler,
  serve_bench,
)
from gptjax import engine as engine_lib
from gptjax import openai_api as api
from gptjax import tokenizer as tokenizer_lib
from gptjax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Only with config.init_from=hf:DIR (as --mode=sample).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "The run (or export) to serve.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0: every one).")
_PORT = flags.DEFINE_integer("port", 8000, "Port to listen on.")
_SLOTS = flags.DEFINE_integer("slots", 8, "Requests decoded together (the batch).")
_CHUNK = flags.DEFINE_integer("chunk", 8, "Tokens per generate call between admissions.")
_MAX_QUEUE = flags.DEFINE_integer("max_queue", 64, "Waiting requests before 429.")
_QUANTIZE = flags.DEFINE_string("quantize", "none", "int8: int8 weights, made as it loads.")
_KV_QUANT = flags.DEFINE_string("kv_quant", "none", "int8: an int8 KV cache.")
_NAME = flags.DEFINE_string("model_name", None, "The model's id in the API (default: the run).")
_USER = flags.DEFINE_string("user_name", "User", "The user's name in templates that name it.")
_ASSISTANT = flags.DEFINE_string("assistant_name", "Assistant", "The model's, likewise.")
_RANDOM = flags.DEFINE_bool(
  "random_weights",
  False,
  "Benchmarks (bench serve): --config's shape with random weights; prompts are token ids and "
  "the replies' text is their ids.",
)


_NAMES = ("User", "Assistant")  # the speakers' names, in templates that name them (play)


class Server:
  """names=None: no chat (random weights, whose 'tokenizer' reads token ids only)."""

  def __init__(self, loaded, name: str, slots: int, chunk: int, queue: int, names=_NAMES):
    self.loaded, self.name, self.tok = loaded, name, loaded.tokenizer
    self.block = loaded.model.cfg.block_size
    self.template = names and _chat_template(loaded, names)
    stop = [self.tok.eot_id] if self.tok.eot_id >= 0 else []
    eng = engine_lib.Engine(loaded.model, loaded.params, slots, stop_tokens=stop, chunk=chunk)
    # Dozens of programs: minutes for GPT-2 on a CPU the first time, seconds from the cache.
    runtime.use_compilation_cache(loaded.config.get("compilation_cache_dir"))
    print(f"compiling the engine's {eng.programs()} programs", file=sys.stderr, flush=True)
    eng.warm_up()
    self.engine, self.sched = eng, scheduler.Scheduler(eng, self.tok, queue)
    self.sched.start()

  def app(self) -> fastapi.FastAPI:
    app = fastapi.FastAPI(title="gptjax")
    app.get("/health")(self.health)
    app.get("/v1/models")(self.models)
    app.get("/v1/models/{model_id:path}")(self.model)
    app.post("/v1/completions")(self.completions)
    app.post("/v1/chat/completions")(self.chat)
    app.exception_handler(pydantic.ValidationError)(api.invalid)
    app.exception_handler(fastapi.exceptions.RequestValidationError)(api.invalid)
    app.exception_handler(starlette.exceptions.HTTPException)(api.http_error)
    return app

  def health(self):
    s = self.sched
    state = "ok" if s.admitting else "stopping"
    return {"status": state, **s.counts(), "compiles": self.engine.compiles()}

  def models(self):
    return {"object": "list", "data": [self._card()]}

  def model(self, model_id: str):
    return self._card() if model_id == self.name else self._unknown(model_id)

  def _card(self) -> dict:
    return {"id": self.name, "object": "model", "created": 0, "owned_by": "gptjax"}

  def _unknown(self, model: str):
    return api.error(404, f"model {model!r} is not served here; this server serves {self.name!r}")

  async def completions(self, body: api.CompletionRequest, http: fastapi.Request):
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
      if len(prompt) != 1:
        return api.error(400, "prompt: one prompt per request (a list of strings must hold one)")
      prompt = prompt[0]
    ids = self._encode(prompt) if isinstance(prompt, str) else self._checked_ids(prompt)
    if isinstance(ids, responses.JSONResponse):
      return ids
    text = prompt if isinstance(prompt, str) else self.tok.decode(ids)
    max_new = 16 if body.max_tokens is None else body.max_tokens
    if max_new == 0 and not body.echo:
      return api.error(400, "max_tokens=0 generates nothing; give max_tokens >= 1 (or echo)")
    k = -1 if body.logprobs is None else body.logprobs
    return await self._respond(body, http, ids, max_new, text if body.echo else None, k)

  async def chat(self, body: api.ChatRequest, http: fastapi.Request):
    if not self.template:
      return api.error(400, "a server with --random_weights completes token ids; it has no chat")
    messages = [m.as_dict() for m in body.messages]
    try:
      ids = self.template.prompt(messages, self.tok).tolist()
    except tokenizer_lib.UnknownCharacter as e:
      return api.error(400, f"messages: {e.problem}: this model cannot read it")
    max_new = body.limit()
    if max_new == 0:
      return api.error(400, "max_tokens=0 generates nothing; give at least 1, or leave it out")
    if max_new is None and len(ids) >= self.block:
      return api.error(
        400,
        f"this model's context is {self.block} tokens and the conversation takes {len(ids)}, "
        "which leaves no room for a reply: shorten the messages",
      )
    max_new = max_new or self.block - len(ids)
    body.stop = [*body.stops(), self.template.end_of_turn]
    return await self._respond(body, http, ids, max_new, None, body.alternatives())

  def _encode(self, text: str):
    try:
      ids = self.tok.encode(text).tolist()
    except tokenizer_lib.UnknownCharacter as e:
      return api.error(400, f"prompt: {e.problem}: this model cannot read it")
    return self._checked_ids(ids)

  def _checked_ids(self, ids: list[int]):
    """Token ids within the vocabulary; an empty prompt as OpenAI reads it (end of text)."""
    bad = [t for t in ids if not 0 <= t < self.tok.vocab_size]
    if bad:
      return api.error(
        400,
        f"prompt: token id {bad[0]} is not in this model's vocabulary (0..{self.tok.vocab_size - 1})",
      )
    if not ids and self.tok.eot_id < 0:
      return api.error(400, "prompt: empty, and this model has no end-of-text token to start from")
    return ids or [self.tok.eot_id]

  async def _respond(self, body, http, ids: list[int], max_new: int, echo_text, k: int):
    """echo_text: the prompt's text to echo (None: no echo; "" echoes an empty prompt)."""
    if body.model is not None and body.model != self.name:
      return self._unknown(body.model)
    if len(ids) + max_new > self.block:
      return api.error(
        400,
        f"this model's context is {self.block} tokens; the prompt has {len(ids)} and "
        f"max_tokens is {max_new} ({len(ids) + max_new} in all): shorten the prompt or lower "
        "max_tokens",
      )
    if body.n > self.sched.waiting.maxsize:
      return api.error(
        400,
        f"n={body.n} is more than this server queues (--max_queue={self.sched.waiting.maxsize})",
      )
    scored = None
    if echo_text is not None and k >= 0:
      try:
        scored = await asyncio.to_thread(self.sched.score, ids)
      except Exception as e:  # the prompt was checked: this is the server's fault
        return api.error(500, f"scoring the prompt failed: {e}")
    if max_new == 0:
      lps, tops = api.scored_lists(scored, k)
      logprobs = None if k < 0 else api.completion_logprobs(self.tok, ids, lps, tops, k)
      return api.answer(
        self.name, [api.choice(0, echo_text, "length", logprobs)], len(ids), 0, False
      )
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    requests = []
    for i in range(body.n):
      put = lambda item, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, *item))
      request = scheduler.Request(
        ids,
        max_new,
        body.temperature,
        body.top_k,
        body.top_p,
        _seed(body.seed, i),
        tuple(body.stops()),
        k,
        on_text=lambda piece, tokens, lps, tops, put=put: put(("text", piece, tokens, lps, tops)),
        on_done=lambda reason, put=put: put(("done", reason)),
      )
      requests.append(request)
    try:
      for request in requests:
        self.sched.submit(request)
    except scheduler.QueueFull as e:
      for request in requests:
        request.cancelled.set()
      return api.error(429, f"server busy: {e}; retry later")
    chat = isinstance(body, api.ChatRequest)
    reply = api.Reply(self.tok, self.name, requests, ids, echo_text or "", scored, k, chat)
    if body.stream:
      usage = bool((body.stream_options or {}).get("include_usage"))
      return responses.StreamingResponse(
        reply.stream(events, usage), media_type="text/event-stream"
      )
    return await reply.collect(events, http)


def _chat_template(loaded, names) -> chat_template.ChatTemplate:
  """The run's template with the speakers named; its own text checked once, here."""
  template = chat_template.load(loaded.config.data.chat_template).with_names(*names)
  try:
    template.prompt([{"role": "user", "content": ""}], loaded.tokenizer)
  except tokenizer_lib.UnknownCharacter as e:
    raise UserError(
      f"{e.problem}, but chat template {template.name} writes it around turns: use a "
      "--user_name and --assistant_name this model can read"
    ) from None
  return template


def _seed(seed: int | None, i: int) -> int:
  """Choice i's seed: the request's own for the first, and for the others one drawn from
  (seed, i), so that seed s with n > 1 does not repeat the samples of seed s + 1."""
  if seed is None:
    return uuid.uuid4().int % 2**31
  if i == 0:
    return seed
  return int(np.random.SeedSequence([seed % 2**63, i]).generate_state(1)[0])


def main(argv) -> None:
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}; flags look like --name=value")
  if _RANDOM.value:
    if _CONFIG.value is None:
      raise UserError("--random_weights takes its shape from --config=experiments/X.py")
    loaded, name = serve_bench.random_weights(_CONFIG.value), _NAME.value or "random"
  elif not _WORKDIR.value:
    raise UserError("usage: python -m gptjax.serve --workdir=DIR [--port=8000]")
  else:
    loaded = inference.load(_WORKDIR.value, _CONFIG.value)
    name = _NAME.value or _WORKDIR.value.rstrip("/").split("/")[-1]
  loaded = inference.quantized(loaded, quantize.Quant(_QUANTIZE.value, _KV_QUANT.value))
  names = None if _RANDOM.value else (_USER.value, _ASSISTANT.value)
  server = Server(loaded, name, _SLOTS.value, _CHUNK.value, _MAX_QUEUE.value, names)
  print(
    f"serving {loaded.where} as {name!r} on http://{_HOST.value}:{_PORT.value}/v1 "
    f"({_SLOTS.value} slots, {server.engine.compiles()} programs compiled)",
    flush=True,
  )
  config = uvicorn.Config(
    server.app(),
    host=_HOST.value,
    port=_PORT.value,
    log_level="warning",
    timeout_graceful_shutdown=30,
  )
  # uvicorn stops gracefully on SIGTERM / Ctrl-C (no new connections, open ones finish),
  # then raises the signal again to the previous handlers: these let the process exit 0.
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda *_: None)
  uvicorn.Server(config).run()
  server.sched.shutdown(timeout=5)
  counts = server.sched.counts()
  print(f"stopped; requests finished by reason: {counts}", flush=True)


def _check_flags() -> None:
  for flag in (_SLOTS, _CHUNK, _MAX_QUEUE):
    if flag.value < 1:
      raise UserError(f"--{flag.name}={flag.value} must be at least 1")
  quantize.Quant(_QUANTIZE.value, _KV_QUANT.value).check()
  if not 0 < _PORT.value < 65536:
    raise UserError(f"--port={_PORT.value} is not a port; use 1..65535 (default 8000)")


if __name__ == "__main__":
  cli.run(main, "gptjax.serve", _check_flags)

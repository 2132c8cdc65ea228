"""An OpenAI-compatible HTTP server: `python -m gptjax.serve --workdir=DIR [--port=8000]`.

Loads what `--mode=sample` loads (a run's newest checkpoint or export, or `--config=...
--config.init_from=hf:DIR`), with the run's tokenizer and chat template, and serves

  POST /v1/completions        prompt, max_tokens, temperature, top_p, top_k, stop, seed, n,
                              stream, logprobs, echo (echo + logprobs + max_tokens=0 scores
                              the prompt: lm-eval's loglikelihood)
  POST /v1/chat/completions   messages rendered by the run's chat template
  GET  /v1/models, GET /health

from one engine thread doing continuous batching (scheduler.py, engine.py). Streaming is
server-sent events ending with `data: [DONE]`. A full queue answers 429, a prompt beyond
the context 400 with the numbers, bad fields 422; SIGTERM stops admitting, finishes what
runs and exits 0.
"""

import asyncio
import json
import signal
import sys
import time
import uuid

import fastapi
import pydantic
import uvicorn
from absl import flags
from fastapi import responses
from ml_collections import config_flags

from gptjax import (
  chat_template,
  cli,
  inference,
  quantize,
  row_sampling,
  runtime,
  scheduler,
  serve_bench,
)
from gptjax import engine as engine_lib
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
_RANDOM = flags.DEFINE_bool(
  "random_weights",
  False,
  "Benchmarks (bench serve): --config's shape with random weights; prompts are token ids and "
  "the replies' text is their ids.",
)


class Sampling(pydantic.BaseModel):
  model: str | None = None
  max_tokens: int | None = pydantic.Field(None, ge=0)
  temperature: float = pydantic.Field(1.0, ge=0, le=100)
  top_p: float = pydantic.Field(1.0, gt=0, le=1)
  top_k: int = pydantic.Field(0, ge=0)
  stop: str | list[str] | None = None
  seed: int | None = None
  n: int = pydantic.Field(1, ge=1, le=16)
  stream: bool = False
  stream_options: dict | None = None  # {"include_usage": true}: usage in a last chunk
  user: str | None = None


class CompletionRequest(Sampling):
  prompt: str | list[str] | list[int]
  logprobs: int | None = pydantic.Field(None, ge=0, le=row_sampling.TOP)
  echo: bool = False


class Message(pydantic.BaseModel):
  role: str = pydantic.Field(pattern="^(system|user|assistant)$")
  content: str


class ChatRequest(Sampling):
  messages: list[Message] = pydantic.Field(min_length=1)


class Server:
  def __init__(self, loaded: inference.Loaded, name: str, slots: int, chunk: int, queue: int):
    self.loaded, self.name, self.tok = loaded, name, loaded.tokenizer
    self.block = loaded.model.cfg.block_size
    self.template = chat_template.load(loaded.config.data.chat_template)
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
    app.post("/v1/completions")(self.completions)
    app.post("/v1/chat/completions")(self.chat)
    app.exception_handler(pydantic.ValidationError)(_invalid)
    app.exception_handler(fastapi.exceptions.RequestValidationError)(_invalid)
    return app

  def health(self):
    s = self.sched
    state = "ok" if s.admitting else "stopping"
    return {"status": state, **s.counts(), "compiles": self.engine.compiles()}

  def models(self):
    model = {"id": self.name, "object": "model", "created": 0, "owned_by": "gptjax"}
    return {"object": "list", "data": [model]}

  async def completions(self, body: CompletionRequest, http: fastapi.Request):
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
      if len(prompt) != 1:
        return _error(400, "prompt: one prompt per request (a list of strings must hold one)")
      prompt = prompt[0]
    ids = prompt if isinstance(prompt, list) else self._encode(prompt)
    if isinstance(ids, responses.JSONResponse):
      return ids
    text = prompt if isinstance(prompt, str) else self.tok.decode(ids)
    max_new = 16 if body.max_tokens is None else body.max_tokens
    if max_new == 0 and not body.echo:
      return _error(400, "max_tokens=0 generates nothing; give max_tokens >= 1 (or echo)")
    return await self._respond(body, http, ids, max_new, text, chat=False)

  async def chat(self, body: ChatRequest, http: fastapi.Request):
    messages = [m.model_dump() for m in body.messages]
    try:
      ids = self.template.prompt(messages, self.tok).tolist()
    except tokenizer_lib.UnknownCharacter as e:
      return _error(400, f"messages: {e.problem}: this model cannot read it")
    max_new = body.max_tokens or max(1, self.block - len(ids))
    body.stop = [*_stops(body.stop), self.template.end_of_turn]
    return await self._respond(body, http, ids, max_new, "", chat=True)

  def _encode(self, text: str):
    try:
      ids = self.tok.encode(text).tolist()
    except tokenizer_lib.UnknownCharacter as e:
      return _error(400, f"prompt: {e.problem}: this model cannot read it")
    return ids or [self.tok.eot_id]

  async def _respond(self, body, http, ids: list[int], max_new: int, echo_text: str, chat: bool):
    if len(ids) + max_new > self.block:
      return _error(
        400,
        f"this model's context is {self.block} tokens; the prompt has {len(ids)} and "
        f"max_tokens is {max_new} ({len(ids) + max_new} in all): shorten the prompt or lower "
        "max_tokens",
      )
    logprobs = getattr(body, "logprobs", None)
    echo = getattr(body, "echo", False)
    scored = None
    if echo and logprobs is not None:
      scored = await asyncio.to_thread(self.sched.score, ids)
    if max_new == 0:
      choice = _choice(0, echo_text, "length", self._logprobs(ids, scored, [], logprobs))
      return self._answer([choice], len(ids), 0, chat)
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
        (body.seed if body.seed is not None else uuid.uuid4().int % 2**31) + i,
        tuple(_stops(body.stop)),
        -1 if logprobs is None else logprobs,
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
      return _error(429, f"server busy: {e}; retry later")
    if body.stream:
      usage = bool((body.stream_options or {}).get("include_usage"))
      stream = self._stream(events, requests, ids, echo_text if echo else "", chat, usage)
      return responses.StreamingResponse(stream, media_type="text/event-stream")
    echo_text = echo_text if echo else ""
    return await self._collect(events, requests, http, ids, echo_text, scored, logprobs, chat)

  async def _collect(self, events, requests, http, ids, echo_text, scored, k, chat):
    texts, reasons = [echo_text] * len(requests), [None] * len(requests)
    made = [[] for _ in requests]
    lps = [[[], []] for _ in requests]
    while None in reasons:
      try:
        i, kind, *rest = await asyncio.wait_for(events.get(), 0.25)
      except TimeoutError:
        if await http.is_disconnected():
          for request in requests:
            request.cancelled.set()
          return responses.Response(status_code=499)
        continue
      if kind == "text":
        texts[i] += rest[0]
        made[i] += rest[1]
        lps[i][0] += rest[2]
        lps[i][1] += rest[3]
      else:
        reasons[i] = rest[0]
    if any(r.startswith("error") for r in reasons):
      return _error(500, next(r for r in reasons if r.startswith("error")))
    choices = [
      _choice(
        i,
        texts[i],
        reasons[i],
        None if k is None else self._logprobs(ids if scored else [], scored, made[i], k, lps[i]),
        chat,
      )
      for i in range(len(requests))
    ]
    return self._answer(choices, len(ids), sum(len(m) for m in made), chat)

  async def _stream(self, events, requests, ids, echo_text, chat, usage: bool):
    kind_name = "chat.completion.chunk" if chat else "text_completion"
    ident, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())

    def chunk(i, piece=None, reason=None, role=False):
      if chat:
        delta = {"role": "assistant", "content": ""} if role else {}
        if piece is not None:
          delta["content"] = piece
        choice = {"index": i, "delta": delta, "finish_reason": reason}
      else:
        choice = {"index": i, "text": piece or "", "finish_reason": reason, "logprobs": None}
      return data({"choices": [choice]})

    def data(fields):
      body = {"id": ident, "object": kind_name, "created": created, "model": self.name}
      return f"data: {json.dumps({**body, **fields})}\n\n"

    try:
      for i in range(len(requests)):
        if chat:
          yield chunk(i, role=True)
        elif echo_text:
          yield chunk(i, echo_text)
      open_, made = set(range(len(requests))), 0
      while open_:
        i, kind, *rest = await events.get()
        if kind == "text":
          made += len(rest[1])
          if rest[0]:
            yield chunk(i, rest[0])
        else:
          open_.discard(i)
          yield chunk(i, reason=rest[0] if rest[0] in ("stop", "length") else "abort")
      if usage:  # OpenAI's stream_options.include_usage: a last chunk with no choices
        counts = {"prompt_tokens": len(ids), "completion_tokens": made}
        yield data({"choices": [], "usage": {**counts, "total_tokens": len(ids) + made}})
      yield "data: [DONE]\n\n"
    finally:  # the client left (or the stream ended): free the slots at the next chunk
      for request in requests:
        request.cancelled.set()

  def _logprobs(self, prompt_ids, scored, made, k, seen=((), ())):
    tokens = list(prompt_ids) + list(made)
    token_lps = [None if v != v else v for v in (scored[0].tolist() if scored else [])]
    token_lps += list(seen[0])
    tops = []
    if k:
      if scored:
        for ids_row, lp_row in zip(scored[1].tolist(), scored[2].tolist()):
          row = {self.tok.decode([t]): v for t, v in zip(ids_row[:k], lp_row[:k]) if t >= 0}
          tops.append(row or None)
      tops += [{self.tok.decode([t]): v for t, v in top.items()} for top in seen[1]]
    pieces = [self.tok.decode([t]) for t in tokens]
    offsets, at = [], 0
    for piece in pieces:
      offsets.append(at)
      at += len(piece)
    return {
      "tokens": pieces,
      "token_logprobs": token_lps,
      "top_logprobs": tops if k else None,
      "text_offset": offsets,
    }

  def _answer(self, choices, prompt_tokens: int, completion_tokens: int, chat: bool):
    return {
      "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
      "object": "chat.completion" if chat else "text_completion",
      "created": int(time.time()),
      "model": self.name,
      "choices": choices,
      "usage": {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
      },
    }


def _choice(i, text, reason, logprobs=None, chat=False):
  reason = reason if reason in ("stop", "length") else "abort"
  if chat:
    return {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
  return {"index": i, "text": text, "finish_reason": reason, "logprobs": logprobs}


def _stops(stop) -> list[str]:
  return [s for s in ([stop] if isinstance(stop, str) else stop or []) if s]


def _error(status: int, message: str) -> responses.JSONResponse:
  kind = {429: "rate_limit_error", 500: "server_error"}.get(status, "invalid_request_error")
  return responses.JSONResponse(
    {"error": {"message": message, "type": kind, "param": None, "code": status}}, status
  )


async def _invalid(request, exc) -> responses.JSONResponse:
  """Malformed JSON or a bad field: 422 naming each field and what is wrong with it."""
  problems = [
    f"malformed JSON at character {e['loc'][-1]} ({e.get('ctx', {}).get('error', e.get('msg'))})"
    if e.get("type") == "json_invalid"
    else f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
    for e in exc.errors()
  ]
  return _error(422, "; ".join(problems))


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
  server = Server(loaded, name, _SLOTS.value, _CHUNK.value, _MAX_QUEUE.value)
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

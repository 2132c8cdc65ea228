"""The OpenAI API's shapes for serve.py: request bodies, checked as they parse (a field we
cannot honour is a 400 naming it, never silently ignored), and answers (whole or streamed,
from the scheduler's events: Reply), logprobs and errors as OpenAI's clients read them."""

import asyncio
import json
import time
import uuid
from typing import Literal

import pydantic
from fastapi import responses

from gptjax import row_sampling


def _neutral(value, neutral, name: str):
  if value not in neutral:
    raise ValueError(f"{name} is not supported by gptjax.serve; leave it out")
  return value


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
  # Accepted at their neutral values only (clients send the defaults).
  frequency_penalty: float = 0.0
  presence_penalty: float = 0.0
  logit_bias: dict | None = None

  @pydantic.field_validator("frequency_penalty", "presence_penalty", "logit_bias")
  @classmethod
  def _no_penalties(cls, value, info):
    return _neutral(value, (0, None, {}), info.field_name)

  def stops(self) -> list[str]:
    stop = self.stop
    return [s for s in ([stop] if isinstance(stop, str) else stop or []) if s]


class CompletionRequest(Sampling):
  prompt: str | list[str] | list[int]
  logprobs: int | None = pydantic.Field(None, ge=0, le=row_sampling.TOP)
  echo: bool = False
  best_of: int | None = None
  suffix: str | None = None

  @pydantic.field_validator("best_of", "suffix")
  @classmethod
  def _no_ranking_or_insertion(cls, value, info):
    return _neutral(value, (None, 1, ""), info.field_name)


class TextPart(pydantic.BaseModel):
  type: Literal["text"]
  text: str


class Message(pydantic.BaseModel):
  role: str = pydantic.Field(pattern="^(system|developer|user|assistant)$")
  content: str | list[TextPart]

  def as_dict(self) -> dict:
    """The template's view: parts joined, and `developer` (OpenAI's newer name) as system."""
    content = self.content
    text = content if isinstance(content, str) else "".join(p.text for p in content)
    return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(Sampling):
  messages: list[Message] = pydantic.Field(min_length=1)
  max_completion_tokens: int | None = pydantic.Field(None, ge=0)  # max_tokens' newer name
  logprobs: bool = False
  top_logprobs: int | None = pydantic.Field(None, ge=0, le=row_sampling.TOP)
  tools: list | None = None
  functions: list | None = None
  response_format: dict | None = None

  @pydantic.field_validator("tools", "functions")
  @classmethod
  def _no_tools(cls, value, info):
    return _neutral(value, (None, []), info.field_name)

  @pydantic.field_validator("response_format")
  @classmethod
  def _text_only(cls, value, info):
    return _neutral(value, (None, {"type": "text"}), "response_format other than text")

  @pydantic.model_validator(mode="after")
  def _top_needs_logprobs(self):
    if self.top_logprobs and not self.logprobs:
      raise ValueError("top_logprobs needs logprobs: true")
    return self

  def limit(self) -> int | None:
    return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

  def alternatives(self) -> int:
    """The scheduler's logprobs: -1 none, else the chosen token's and this many others."""
    return (self.top_logprobs or 0) if self.logprobs else -1


# --- answers ------------------------------------------------------------------------------


def completion_logprobs(tok, tokens, token_lps, tops, k: int, offset: int = 0) -> dict:
  """The legacy completions' logprobs: tokens, their logprobs (null where there is none: a
  prompt's first token), the top k alternatives of each and each token's text offset."""
  pieces = [tok.decode([t]) for t in tokens]
  offsets = []
  for piece in pieces:
    offsets.append(offset)
    offset += len(piece)
  top = [_named(tok, t) or None for t in tops] if k else None
  return {
    "tokens": pieces,
    "token_logprobs": [_finite(v) for v in token_lps],
    "top_logprobs": top,
    "text_offset": offsets,
  }


def chat_logprobs(tok, tokens, token_lps, tops) -> dict:
  """Chat's logprobs: per token its text, logprob, raw bytes (a token holding part of a
  character has that part: a client joins them) and top alternatives."""

  def entry(t, value):
    return {"token": tok.decode([t]), "logprob": _finite(value), "bytes": list(tok.token_bytes(t))}

  content = []
  for i, (t, value) in enumerate(zip(tokens, token_lps)):
    alternatives = tops[i].items() if i < len(tops) else ()  # by id: texts may coincide
    top = [entry(t, v) for t, v in alternatives]
    content.append({**entry(t, value), "top_logprobs": top})
  return {"content": content}


def scored_lists(scored, k: int):
  """engine.score's arrays as (logprobs, tops): tops as {id: logprob}, the k best."""
  if scored is None:
    return [], []
  tops = [
    {t: v for t, v in zip(ids[:k], lps[:k]) if t >= 0}
    for ids, lps in zip(scored[1].tolist(), scored[2].tolist())
  ]
  return scored[0].tolist(), tops


def choice(i, text, reason, logprobs=None, chat=False) -> dict:
  if chat:
    message = {"role": "assistant", "content": text}
    return {"index": i, "message": message, "finish_reason": reason, "logprobs": logprobs}
  return {"index": i, "text": text, "finish_reason": reason, "logprobs": logprobs}


def answer(name: str, choices, prompt_tokens: int, completion_tokens: int, chat: bool) -> dict:
  return {
    "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
    "object": "chat.completion" if chat else "text_completion",
    "created": int(time.time()),
    "model": name,
    "choices": choices,
    "usage": usage(prompt_tokens, completion_tokens),
  }


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
  total = prompt_tokens + completion_tokens
  return {
    "prompt_tokens": prompt_tokens,
    "completion_tokens": completion_tokens,
    "total_tokens": total,
  }


def error(status: int, message: str) -> responses.JSONResponse:
  return responses.JSONResponse(error_body(status, message), status)


def error_body(status: int, message: str) -> dict:
  kind = {
    404: "not_found_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
  }.get(status, "invalid_request_error")
  return {"error": {"message": message, "type": kind, "param": None, "code": status}}


async def invalid(request, exc) -> responses.JSONResponse:
  """Malformed JSON or a bad field: 400 (as OpenAI answers) naming each field and its fault."""
  problems = []
  for e in exc.errors():
    if e.get("type") == "json_invalid":
      why = e.get("ctx", {}).get("error", e.get("msg"))
      problems.append(f"malformed JSON at character {e['loc'][-1]} ({why})")
      continue
    where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
    message = str(e.get("msg")).removeprefix("Value error, ")  # our validators' own words
    problems.append(f"{where}: {message}" if where and not message.startswith(where) else message)
  return error(400, "; ".join(problems))


async def http_error(request, exc) -> responses.JSONResponse:
  """FastAPI's own answers (404 no such path, 405 wrong method) in OpenAI's error shape."""
  return error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")


class Reply:
  """One request's answer, whole or streamed, from the events of its n choices."""

  def __init__(self, tok, name: str, requests, ids, echo_text: str, scored, k: int, chat: bool):
    self.tok, self.name, self.requests, self.ids = tok, name, requests, ids
    self.echo_text, self.scored, self.k, self.chat = echo_text, scored, k, chat

  def _logprobs(self, tokens, lps, tops, offset: int = 0, prompt: bool = False):
    if self.k < 0:
      return None
    if self.chat:
      return chat_logprobs(self.tok, tokens, lps, tops)
    if prompt and self.scored is not None:  # echo: the prompt's own logprobs first
      p_lps, p_tops = scored_lists(self.scored, self.k)
      tokens, lps, tops = self.ids + tokens, p_lps + lps, p_tops + tops
    return completion_logprobs(self.tok, tokens, lps, tops, self.k, offset)

  def _generated(self) -> int:
    return sum(r.generated for r in self.requests)

  async def collect(self, events, http):
    n = len(self.requests)
    texts, reasons = [self.echo_text] * n, [None] * n
    made = [([], [], []) for _ in range(n)]  # tokens, logprobs, tops
    check_at = time.monotonic()
    while None in reasons:
      try:
        i, kind, *rest = await asyncio.wait_for(events.get(), 0.25)
        if kind == "text":
          texts[i] += rest[0]
          for have, new in zip(made[i], rest[1:]):
            have += new
        else:
          reasons[i] = rest[0]
      except asyncio.TimeoutError:  # not the builtin one before Python 3.11
        pass
      if time.monotonic() >= check_at:  # a client that left frees its slots within a chunk
        check_at = time.monotonic() + 0.25
        if await http.is_disconnected():
          for request in self.requests:
            request.cancelled.set()
          return responses.Response(status_code=499)
    for reason in reasons:
      if reason not in ("stop", "length"):
        return error(*_failure(reason))
    choices = [
      choice(i, texts[i], reasons[i], self._logprobs(*made[i], prompt=True), self.chat)
      for i in range(n)
    ]
    return answer(self.name, choices, len(self.ids), self._generated(), self.chat)

  async def stream(self, events, include_usage: bool):
    kind_name = "chat.completion.chunk" if self.chat else "text_completion"
    ident = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())

    def chunk(i, piece=None, reason=None, logprobs=None, role=False):
      if self.chat:
        delta = {"role": "assistant", "content": ""} if role else {}
        if piece is not None:
          delta["content"] = piece
        choice = {"index": i, "delta": delta, "finish_reason": reason, "logprobs": logprobs}
      else:
        choice = {"index": i, "text": piece or "", "finish_reason": reason, "logprobs": logprobs}
      return data({"choices": [choice]})

    def data(fields):
      body = {"id": ident, "object": kind_name, "created": created, "model": self.name}
      return f"data: {json.dumps({**body, **fields})}\n\n"

    try:
      offsets = [len(self.echo_text)] * len(self.requests)
      for i in range(len(self.requests)):
        if self.chat:
          yield chunk(i, role=True)
        elif self.echo_text or self.scored is not None:  # echo: the prompt, and its logprobs
          yield chunk(i, self.echo_text, logprobs=self._logprobs([], [], [], prompt=True))
      open_ = set(range(len(self.requests)))
      while open_:
        i, kind, *rest = await events.get()
        if kind == "text":
          if rest[0] or rest[1]:
            yield chunk(i, rest[0], logprobs=self._logprobs(*rest[1:], offset=offsets[i]))
          offsets[i] += len(rest[0])
        elif rest[0] in ("stop", "length"):
          open_.discard(i)
          yield chunk(i, reason=rest[0])
        else:  # OpenAI's clients raise on an error event
          yield data(error_body(*_failure(rest[0])))
          break
      if include_usage:  # OpenAI's stream_options.include_usage: a last chunk with no choices
        yield data({"choices": [], "usage": usage(len(self.ids), self._generated())})
      yield "data: [DONE]\n\n"
    finally:  # the client left (or the stream ended): free the slots at the next chunk
      for request in self.requests:
        request.cancelled.set()


def _failure(reason: str) -> tuple[int, str]:
  if reason == "abort":  # the client is here, so the server stopped
    return 503, "the server stopped before this request finished; retry"
  return 500, reason.removeprefix("error: ")


def _named(tok, top: dict) -> dict:
  return {tok.decode([t]): _finite(v) for t, v in top.items()}


def _finite(value):
  return None if value is None or value != value or abs(value) == float("inf") else value

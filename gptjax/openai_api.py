"""The OpenAI API's shapes for serve.py: request bodies, checked as they parse (a field we
cannot honour is a 400 naming it, never silently ignored), and answers, logprobs and errors
as OpenAI's clients read them."""

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
  """Chat's logprobs: per token its text, logprob, UTF-8 bytes and top alternatives."""

  def entry(text, value):
    return {"token": text, "logprob": _finite(value), "bytes": list(text.encode())}

  content = []
  for i, (t, value) in enumerate(zip(tokens, token_lps)):
    alternatives = tops[i].items() if i < len(tops) else ()  # by id: texts may coincide
    top = [entry(tok.decode([t]), v) for t, v in alternatives]
    content.append({**entry(tok.decode([t]), value), "top_logprobs": top})
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


def _named(tok, top: dict) -> dict:
  return {tok.decode([t]): _finite(v) for t, v in top.items()}


def _finite(value):
  return None if value is None or value != value or abs(value) == float("inf") else value

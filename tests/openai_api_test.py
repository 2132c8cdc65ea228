"""The OpenAI API's shapes: which request fields parse, which are refused (and how the refusal
reads), and logprobs as the completions and chat APIs give them."""

import asyncio
import json
import math

import pydantic
import pytest

from gptjax import openai_api as api
from gptjax.tokenizer import ByteTokenizer, CharTokenizer


def _refusal(model, **body) -> str:
  with pytest.raises(pydantic.ValidationError) as e:
    model(**body)
  answer = asyncio.run(api.invalid(None, e.value))
  assert answer.status_code == 400
  return json.loads(answer.body)["error"]["message"]


def test_fields_we_cannot_honour_are_refused_by_name_and_their_defaults_pass():
  for field, value in (
    ("frequency_penalty", 0.5),
    ("presence_penalty", -1),
    ("logit_bias", {"5": -100}),
    ("best_of", 3),
    ("suffix", "end"),
  ):
    message = _refusal(api.CompletionRequest, prompt="x", **{field: value})
    assert message == f"{field} is not supported by gptjax.serve; leave it out"
  defaults = {"frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {}, "best_of": 1}
  api.CompletionRequest(prompt="x", **defaults)  # what many clients send
  user = [{"role": "user", "content": "Hi"}]
  assert "tools" in _refusal(api.ChatRequest, messages=user, tools=[{"type": "function"}])
  assert "response_format" in _refusal(
    api.ChatRequest, messages=user, response_format={"type": "json_object"}
  )
  assert _refusal(api.ChatRequest, messages=user, top_logprobs=2) == (
    "top_logprobs needs logprobs: true"
  )
  assert _refusal(api.CompletionRequest, prompt="x", temperature=-1) == (
    "temperature: Input should be greater than or equal to 0"
  )
  assert _refusal(api.CompletionRequest) == "prompt: Field required"
  assert _refusal(api.CompletionRequest, prompt="x", n=0) == (
    "n: Input should be greater than or equal to 1"  # "n" is in the message: still named
  )


def test_newer_chat_fields_developer_role_text_parts_and_max_completion_tokens():
  body = api.ChatRequest(
    messages=[
      {"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
      {"role": "user", "content": "Hi"},
    ],
    max_tokens=9,
    max_completion_tokens=3,
    logprobs=True,
  )  # fmt: skip
  assert [m.as_dict() for m in body.messages] == [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
  ]
  assert body.limit() == 3 and body.alternatives() == 0
  assert api.ChatRequest(messages=[{"role": "user", "content": "Hi"}]).alternatives() == -1
  image = {"type": "image_url", "image_url": {"url": "x"}}
  assert "messages.0.content" in _refusal(
    api.ChatRequest, messages=[{"role": "user", "content": [image]}]
  )


def test_logprobs_as_the_completions_and_chat_apis_give_them():
  tok = CharTokenizer("abc")  # a=0, b=1, c=2, end of text 3
  legacy = api.completion_logprobs(
    tok, [0, 1, 2], [math.nan, -0.5, -1.0], [{}, {1: -0.5, 2: -2.0}, {2: -1.0}], k=2,
    offset=4,
  )  # fmt: skip
  assert legacy == {
    "tokens": ["a", "b", "c"],
    "token_logprobs": [None, -0.5, -1.0],  # a prompt's first token has none (null, not NaN)
    "top_logprobs": [None, {"b": -0.5, "c": -2.0}, {"c": -1.0}],
    "text_offset": [4, 5, 6],
  }
  assert api.completion_logprobs(tok, [0], [-0.1], [], k=0)["top_logprobs"] is None
  chat = api.chat_logprobs(tok, [1], [-0.5], [{1: -0.5, 0: -1.5}])
  assert chat == {
    "content": [
      {
        "token": "b",
        "logprob": -0.5,
        "bytes": [98],
        "top_logprobs": [
          {"token": "b", "logprob": -0.5, "bytes": [98]},
          {"token": "a", "logprob": -1.5, "bytes": [97]},
        ],
      }
    ]
  }
  split = api.chat_logprobs(ByteTokenizer(), [0xC3, 0xA9], [-0.1, -0.2], [])  # "é", 2 tokens
  assert [e["bytes"] for e in split["content"]] == [[0xC3], [0xA9]]  # joined: the character
  assert bytes(sum((e["bytes"] for e in split["content"]), [])).decode() == "é"

"""Chat: replies stream over several jitted calls, stop at the end of a turn, the oldest turns
are dropped to fit the context, and the CLI session runs on stdin."""

import jax
import jax.numpy as jnp
import pytest
from conftest import ONE_DEVICE, run_cli, tiny_config

from gptjax import chat, chat_template, decode
from gptjax import tokenizer as tokenizer_lib
from gptjax.errors import UserError
from gptjax.model import GPT, GPTConfig

TOKENIZER = tokenizer_lib.CharTokenizer("abcdefghijklmnopqrstuvwxyzUA:,. \n")
TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"  # jax.monitoring: one per jit trace


def _chat(max_new=10, chunk=2, seed=0):
  model = GPT(GPTConfig.from_config(tiny_config().model, TOKENIZER.vocab_size))
  params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 32), jnp.int32))["params"]
  params = jax.tree.map(lambda x: x.value, params, is_leaf=lambda x: hasattr(x, "value"))
  template = chat_template.load("play").with_names("U", "A")
  stop = chat_template.encode_text(TOKENIZER, template.end_of_turn).tolist()
  decoder = decode.Decoder(model, params, [TOKENIZER.eot_id], [stop])
  notes = []
  return chat.Chat(
    decoder, TOKENIZER, template, max_new, decode.Sampling(1.0), chunk, seed, notes.append
  ), notes


@pytest.mark.slow
def test_replies_stream_over_several_calls_and_end_at_the_turn():
  c, _ = _chat(max_new=10, chunk=2)
  pieces = []
  reply = c.reply("hi", pieces.append)
  assert "".join(pieces) == reply and "\n\n" not in reply
  assert len(reply) > 2 and len(pieces) >= 2  # text arrived after more than one call
  assert c.messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply}]
  assert c.template.render(c.messages) == f"U:\nhi\n\nA:\n{reply}\n\n"


@pytest.mark.slow
def test_the_oldest_turns_are_dropped_to_fit_the_context():
  c, notes = _chat(max_new=8)
  c.messages = [{"role": "system", "content": "be"}]  # set-up that outlives every drop
  traces, after_each_turn = [], []  # jit traces (and compiles) each new input shape once

  def listen(event, duration, fun_name="", **kwargs):
    if event == TRACE_EVENT:
      traces.append(fun_name)

  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    for text in ["one", "two two", "three three", "four four four"]:
      c.reply(text, lambda piece: None)
      after_each_turn.append(len(traces))
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  # One compile per session: the prompt is always padded to the same width, so the first
  # reply traces its steps and later replies (longer histories included) trace nothing.
  assert after_each_turn[0] > 0 and after_each_turn == after_each_turn[:1] * 4, traces
  prompt = TOKENIZER.decode(c.context("five"))
  assert len(prompt) <= c.width  # prompt + reply budget within the 32-token context
  assert prompt.startswith("be\n\n") and prompt.endswith("U:\nfive\n\nA:\n")
  assert "U:\none" not in prompt and len(c.messages) % 2 == 1  # whole pairs dropped
  assert any("dropped the oldest" in n for n in notes)
  c.reset()
  assert c.messages == [{"role": "system", "content": "be"}]


def test_chat_errors():
  with pytest.raises(UserError, match="in chat use 1..20"):  # 24 - len("A:\n") - 1
    _chat(max_new=21)
  assert _chat(max_new=20)[0].max_new == 20
  assert _chat(max_new=None)[0].max_new == 16  # half the context
  c, _ = _chat()
  with pytest.raises(UserError, match="'é'"):
    c.reply("café", lambda piece: None)
  assert c.messages == [] and c.replies == 0


@pytest.mark.slow
def test_chat_session_on_stdin(trained_tiny):
  proc = run_cli(
    "--mode=chat",
    f"--workdir={trained_tiny}",
    "--max_new_tokens=12",
    "--user_name=ROMEO",
    "--assistant_name=JULIET",
    stdin="Good morrow.\r\nCaf\u00e9?\n/reset\nFarewell.\n",  # a Windows line end, once
    env=ONE_DEVICE,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.count("JULIET: ") == 2  # the bad line got no reply, the others did
  assert "character '\u00e9'" in proc.stderr and "conversation forgotten" in proc.stderr
  assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_chat_default_reply_length_fits_a_small_context(trained_tiny):
  """The default (half the 32-token context) left too little room beside JULIET's reply
  prefix, and chat refused its own default; now it shortens to what fits."""
  proc = run_cli(
    "--mode=chat",
    f"--workdir={trained_tiny}",
    "--user_name=ROMEO",
    "--assistant_name=JULIET",
    stdin="Good morrow.\n",
    env=ONE_DEVICE,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "replies up to 15 tokens" in proc.stderr  # 24 - len("JULIET:\n") - 1
  assert proc.stdout.count("JULIET: ") == 1

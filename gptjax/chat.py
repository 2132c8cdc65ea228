"""--mode=chat: an interactive multi-turn session on stdin, replies printed as they are made.

The conversation is a list of messages rendered by the run's chat template
(config.data.chat_template, gptjax/chat_template.py): the model is asked for a reply exactly as
fine-tuning showed it replies, and a reply ends at the template's end-of-turn marker. The
default, play, is Shakespeare's layout, which a base model trained on the plays continues:

    User:
    hello there

    Assistant:
    <the reply, ended by a blank line, end-of-text, or the token budget>

Each reply prefills the whole conversation once and then streams: `Decoder.generate` runs a
few tokens per jitted call and the text is printed after each call. The prompt is always
left-padded to context - budget tokens, so prefill and generate compile once per session.
When the conversation no longer fits, the oldest turns are dropped (whole user and assistant
pairs; a leading system turn stays).
"""

import dataclasses
import sys

import numpy as np

from gptjax import chat_template, decode, inference, quantize
from gptjax import tokenizer as tokenizer_lib
from gptjax.errors import UserError

# A conversation about to be answered: its prompt less its render is the generation prompt.
_PROBE = [{"role": "user", "content": ""}]


class Chat:
  """One conversation: its messages, and reply() to add a user message and answer it."""

  def __init__(
    self,
    decoder: decode.Decoder,
    tokenizer,
    template: chat_template.ChatTemplate,
    max_new: int | None,
    sampling: decode.Sampling,
    chunk: int = 8,
    seed: int = 0,
    notify=None,
  ):
    """max_new None: half the context, or less where the conversation needs the room."""
    block = decoder.model.cfg.block_size
    rendered = chat_template.encode_text(tokenizer, template.render(_PROBE))
    self.prefix = len(template.prompt(_PROBE, tokenizer)) - len(rendered)
    most = longest_reply(block, self.prefix)
    if most < 1:
      raise UserError(
        f"the model's {block}-token context is too short for a conversation "
        f"in chat template {template.name}; use --mode=sample"
      )
    max_new = min(block // 2, most) if max_new is None else max_new
    if not 1 <= max_new <= most:
      raise UserError(
        f"--max_new_tokens={max_new} leaves too little of the {block}-token "
        f"context for the conversation; in chat use 1..{most}"
      )
    if chunk < 1:
      raise UserError(f"--stream_tokens={chunk} must be at least 1")
    self.decoder, self.tokenizer, self.template = decoder, tokenizer, template
    self.max_new, self.sampling, self.chunk, self.seed = max_new, sampling, chunk, seed
    self.width = block - max_new  # the prompt's padded length: one compile per session
    self.notify = notify or (lambda message: None)
    self.messages: list[dict] = []  # {"role", "content"}, oldest first
    self.replies = 0

  def reset(self) -> None:
    """Forgets the conversation (a system turn, which sets it up, stays)."""
    self.messages = self.messages[: self._system()]

  def _system(self) -> int:
    return int(bool(self.messages) and self.messages[0]["role"] == "system")

  def context(self, text: str) -> list[int]:
    """The prompt asking for a reply to the user's `text`, with as many of the newest turns
    as fit, whole. UnknownCharacter (naming the character) if the text cannot be encoded."""
    system, history = self.messages[: self._system()], self.messages[self._system() :]
    user = [{"role": "user", "content": text}]
    while True:
      ids = self.template.prompt(system + history + user, self.tokenizer).tolist()
      if len(ids) <= self.width or not history:
        break
      history = history[2:]  # the oldest user turn and its reply
    dropped = len(self.messages) - len(system) - len(history)
    if dropped:
      self.notify(
        f"dropped the oldest {dropped} turn{'s' * (dropped > 1)} to fit the "
        f"{self.decoder.model.cfg.block_size}-token context"
      )
      self.messages = system + history
    if len(ids) > self.width:
      room = self.width - self.prefix
      self.notify(
        f"your message takes {len(ids) - self.prefix} tokens with the template's text around "
        f"it; the model sees the last {room}"
      )
      ids = ids[-self.width :]
    return ids

  def reply(self, text: str, write, prompt: list[int] | None = None) -> str:
    """Answers the user's `text`, calling write(piece) as the reply's text grows; returns it.
    prompt: context(text) if already made. UnknownCharacter if text cannot be encoded."""
    prompt = self.context(text) if prompt is None else prompt
    tokens = np.zeros((1, self.width), np.int32)
    tokens[0, self.width - len(prompt) :] = prompt
    start = np.array([self.width - len(prompt)], np.int32)
    state = self.decoder.prefill(tokens, start, self.max_new, self.seed + self.replies)
    self.replies += 1
    ids, shown, stop = [], 0, self.template.end_of_turn
    while True:
      state, out, count = self.decoder.generate(state, self.chunk, self.sampling)
      ids += np.asarray(out)[0, : int(count[0])].tolist()
      ids = ids[: self.max_new]
      made = chat_template.decode_text(self.tokenizer, ids)
      finished = bool(state.done_B[0]) or len(ids) >= self.max_new or stop in made
      reply = made.split(stop)[0].split(tokenizer_lib.EOT)[0]
      safe = len(reply) if finished else _safe_length(reply, stop)
      if safe > shown:
        write(reply[shown:safe])
        shown = safe
      if finished:
        break
    self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
    return reply


def longest_reply(block: int, prefix: int) -> int:
  """The most tokens a reply may take: a quarter of the context stays for the conversation
  (the user's turn, the generation prompt and at least one token of history)."""
  return block * 3 // 4 - prefix - 1


def _safe_length(text: str, stop: str) -> int:
  """How much of a growing reply can be shown: not a tail that may become the stop string,
  nor an incomplete UTF-8 character (decoded as U+FFFD)."""
  n = len(text)
  for k in range(min(len(stop) - 1, n), 0, -1):
    if text.endswith(stop[:k]):
      n -= k
      break
  while n and text[n - 1] == "\ufffd":
    n -= 1
  return n


@dataclasses.dataclass(frozen=True)
class Options:
  """--mode=chat's settings: reply budget (None: half the context), sampling, the seed of
  the first reply (each reply takes the next), tokens per jitted call (streaming), and the
  speakers' names (shown, and given to the chat template, which may ignore them)."""

  max_new: int | None = None
  sampling: decode.Sampling = decode.Sampling(0.8)
  seed: int = 0
  chunk: int = 8
  user_name: str = "User"
  assistant_name: str = "Assistant"
  quant: quantize.Quant = quantize.Quant()  # int8 weights / KV cache


def run(workdir: str, options: Options, config=None, stdin=None, stdout=None) -> int:
  """The interactive loop; returns the number of replies. /reset forgets the conversation,
  /quit (or end of input, or Ctrl-C) ends the session."""
  stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
  notify = lambda message: print(f"[{message}]", file=sys.stderr, flush=True)
  loaded = inference.load(workdir, config, quant=options.quant)
  chat = open_chat(loaded, options, notify)
  notify(
    f"chatting with {loaded.where} of {workdir} ({loaded.model.cfg.block_size}-token context, "
    f"chat template {chat.template.name}, replies up to {chat.max_new} tokens); /reset "
    "forgets the conversation, /quit ends"
  )
  write = lambda piece: (stdout.write(piece), stdout.flush())
  try:
    while (line := _prompt(options.user_name, stdin, write)) is not None:
      text = line.strip()
      if text == "/quit":
        break
      if text == "/reset":
        chat.reset()
        notify("conversation forgotten")
      elif text:
        try:
          prompt = chat.context(line)  # the message's characters, checked before the name
        except tokenizer_lib.UnknownCharacter as e:
          notify(f"error: {e.problem}; type the message again without it")
          continue
        write(f"{options.assistant_name}: ")
        chat.reply(line, write, prompt)
        write("\n")
  except KeyboardInterrupt:
    write("\n")
  return chat.replies


def open_chat(loaded: inference.Loaded, options: Options, notify) -> Chat:
  """A conversation with a loaded model in its run's chat template; UserError if the
  template's own text (speaker names included) cannot be encoded."""
  tok = loaded.tokenizer
  options.sampling.check(loaded.model.cfg.vocab_size)
  template = chat_template.load(loaded.config.data.chat_template)
  template = template.with_names(options.user_name, options.assistant_name)
  try:
    stop = chat_template.encode_text(tok, template.end_of_turn).tolist()
    template.prompt(_PROBE, tok)
  except tokenizer_lib.UnknownCharacter as e:
    raise UserError(
      f"{e.problem}, but chat template {template.name} writes it around turns: use a "
      "--user_name and --assistant_name this model can read"
    ) from None
  decoder = decode.Decoder(
    loaded.model, loaded.params, stop_tokens=[tok.eot_id], stop_sequences=[stop]
  )
  return Chat(
    decoder, tok, template, options.max_new, options.sampling, options.chunk, options.seed, notify
  )


def _prompt(user: str, stdin, write) -> str | None:
  """Shows the user's prompt and reads a line (None at end of input)."""
  write(f"{user}: ")
  line = stdin.readline()
  if not line:
    write("\n")
    return None
  return line.rstrip("\r\n")  # a Windows line end is not part of the message

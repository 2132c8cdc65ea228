"""--mode=chat: an interactive multi-turn session on stdin, replies printed as they are made.

The conversation is plain text in one template (Shakespeare's play layout, which a base model
trained on it continues naturally):

    User:
    hello there

    Assistant:
    <the reply, ended by a blank line, end-of-text, or the token budget>

Each reply prefills the whole conversation once and then streams: `Decoder.generate` runs a
few tokens per jitted call and the text is printed after each call. The prompt is always
left-padded to context - budget tokens, so prefill and generate compile once per session.
When the conversation no longer fits, the oldest turns are dropped (whole turns).
"""

import dataclasses
import sys

import numpy as np

from gptjax import decode, inference
from gptjax import tokenizer as tokenizer_lib
from gptjax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Template:
  """How turns become text. Supervised fine-tuning's chat templates will replace this."""

  user: str = "User"
  assistant: str = "Assistant"
  end_of_turn: str = "\n\n"

  def turn(self, speaker: str, text: str) -> str:
    return f"{speaker}:\n{text}{self.end_of_turn}"

  def reply_prefix(self) -> str:
    return f"{self.assistant}:\n"


class Chat:
  """One conversation: its turns as token ids, and reply() to add a user turn and answer it."""

  def __init__(
    self,
    decoder: decode.Decoder,
    tokenizer,
    template: Template,
    max_new: int | None,
    sampling: decode.Sampling,
    chunk: int = 8,
    seed: int = 0,
    notify=None,
  ):
    """max_new None: half the context, or less where the conversation needs the room."""
    block = decoder.model.cfg.block_size
    self.prefix = tokenizer.encode(template.reply_prefix()).tolist()
    most = longest_reply(block, len(self.prefix))
    if most < 1:
      raise UserError(
        f"the model's {block}-token context is too short for a conversation "
        "in this template; use --mode=sample"
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
    self.turns: list[list[int]] = []  # token ids of each finished turn, oldest first
    self.replies = 0

  def reset(self) -> None:
    self.turns = []

  def context(self, user_ids: list[int]) -> list[int]:
    """The prompt for the next reply: as many of the newest turns as fit, whole."""
    room = self.width - len(self.prefix)
    if len(user_ids) > room:
      self.notify(f"your message has {len(user_ids)} tokens; the model sees its last {room}")
      user_ids = user_ids[-room:]
    kept, used = [], len(user_ids)
    for ids in reversed(self.turns):
      if used + len(ids) > room:
        break
      kept.insert(0, ids)
      used += len(ids)
    if len(kept) < len(self.turns):
      dropped = len(self.turns) - len(kept)
      self.notify(
        f"dropped the oldest {dropped} turn{'s' * (dropped > 1)} to fit the "
        f"{self.decoder.model.cfg.block_size}-token context"
      )
      self.turns = kept
    return [t for ids in kept for t in ids] + user_ids + self.prefix

  def user_turn(self, text: str) -> list[int]:
    """The ids of a user message; UserError (naming the character) if it cannot be encoded."""
    return self.tokenizer.encode(self.template.turn(self.template.user, text)).tolist()

  def reply(self, user_ids: list[int], write) -> str:
    """Answers a user turn, calling write(piece) as the reply's text grows; returns it."""
    prompt = self.context(user_ids)
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
      body = [t for t in ids if t != self.tokenizer.eot_id]
      reply = self.tokenizer.decode(body)
      finished = bool(state.done_B[0]) or len(ids) >= self.max_new or stop in reply
      reply = reply.split(stop)[0]
      safe = len(reply) if finished else _safe_length(reply, stop)
      if safe > shown:
        write(reply[shown:safe])
        shown = safe
      if finished:
        break
    self.turns.append(user_ids)
    self.turns.append(self.prefix + self.tokenizer.encode(reply + stop).tolist())
    return reply


def longest_reply(block: int, prefix: int) -> int:
  """The most tokens a reply may take: a quarter of the context stays for the conversation
  (the user's turn, the reply prefix and at least one token of history)."""
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
  the first reply (each reply takes the next), and tokens per jitted call (streaming)."""

  max_new: int | None = None
  sampling: decode.Sampling = decode.Sampling(0.8)
  seed: int = 0
  chunk: int = 8


def run(workdir: str, options: Options, template: Template, config=None, stdin=None, stdout=None):
  """The interactive loop; returns the number of replies. /reset forgets the conversation,
  /quit (or end of input, or Ctrl-C) ends the session."""
  stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
  notify = lambda message: print(f"[{message}]", file=sys.stderr, flush=True)
  loaded = inference.load(workdir, config)
  chat = open_chat(loaded, options, template, notify)
  notify(
    f"chatting with {loaded.where} of {workdir} ({loaded.model.cfg.block_size}-token context, replies "
    f"up to {chat.max_new} tokens); /reset forgets the conversation, /quit ends"
  )
  write = lambda piece: (stdout.write(piece), stdout.flush())
  try:
    while (line := _prompt(template.user, stdin, write)) is not None:
      text = line.strip()
      if text == "/quit":
        break
      if text == "/reset":
        chat.reset()
        notify("conversation forgotten")
      elif text:
        try:
          user_ids = chat.user_turn(line)
        except tokenizer_lib.UnknownCharacter as e:
          notify(f"error: {e.problem}; type the message again without it")
          continue
        write(f"{template.assistant}: ")
        chat.reply(user_ids, write)
        write("\n")
  except KeyboardInterrupt:
    write("\n")
  return chat.replies


def open_chat(loaded: inference.Loaded, options: Options, template: Template, notify) -> Chat:
  """A conversation with a loaded model; UserError if the template's names cannot be read."""
  tok = loaded.tokenizer
  options.sampling.check(loaded.model.cfg.vocab_size)
  try:
    tok.encode(template.turn(template.user, "") + template.reply_prefix())
  except tokenizer_lib.UnknownCharacter as e:
    raise UserError(
      f"{e.problem}: use a --user_name and --assistant_name this model can read"
    ) from None
  stop = tok.encode(template.end_of_turn).tolist()
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
  return line.rstrip("\n")

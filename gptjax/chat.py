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

from gptjax import decode, tokenizers
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


def run(
  workdir: str,
  max_new: int | None,
  temperature: float,
  top_k: int,
  top_p: float,
  seed: int,
  chunk: int,
  user: str,
  assistant: str,
  config=None,
  stdin=None,
  stdout=None,
) -> int:
  """The interactive loop; returns the number of replies. /reset forgets the conversation,
  /quit (or end of input, or Ctrl-C) ends the session."""
  from gptjax import sample  # loading is shared with --mode=sample

  stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
  model, params, tokenizer, where = sample.load(workdir, config)
  sampling = decode.Sampling(temperature, top_k, top_p)
  sampling.check(model.cfg.vocab_size)
  template = Template(user, assistant)
  try:
    tokenizer.encode(template.turn(user, "") + template.reply_prefix())
  except tokenizers.UnknownCharacter as e:
    raise UserError(
      f"{e.problem}: use a --user_name and --assistant_name this model can read"
    ) from None
  stop = tokenizer.encode(template.end_of_turn).tolist()
  decoder = decode.Decoder(model, params, stop_tokens=[tokenizer.eot_id], stop_sequences=[stop])
  block = model.cfg.block_size
  notify = lambda message: print(f"[{message}]", file=sys.stderr, flush=True)
  chat = Chat(decoder, tokenizer, template, max_new, sampling, chunk, seed, notify)
  notify(
    f"chatting with {where} of {workdir} ({block}-token context, replies up to "
    f"{chat.max_new} tokens); /reset forgets the conversation, /quit ends"
  )
  write = lambda piece: (stdout.write(piece), stdout.flush())
  try:
    while True:
      write(f"{user}: ")
      line = stdin.readline()
      if not line:
        write("\n")
        break
      text = line.rstrip("\n")
      if text.strip() == "/quit":
        break
      if text.strip() == "/reset":
        chat.reset()
        notify("conversation forgotten")
        continue
      if not text.strip():
        continue
      try:
        user_ids = chat.user_turn(text)
      except tokenizers.UnknownCharacter as e:
        notify(f"error: {e.problem}; type the message again without it")
        continue
      write(f"{assistant}: ")
      chat.reply(user_ids, write)
      write("\n")
  except KeyboardInterrupt:
    write("\n")
  return chat.replies

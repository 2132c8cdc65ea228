"""Chat templates: how a conversation becomes text, and which of its tokens are trained on.

A template is Jinja2 source, as Hugging Face's and MaxText's are: it sees `messages` (dicts
with "role" in system / user / assistant, and "content") and `add_generation_prompt`, and
renders text. `<|endoftext|>` in that text is the tokenizer's end-of-text id, whatever the
tokenizer (char, byte, BPE, SentencePiece), so a template can end turns with it.

Loss masks come from rendering prefixes of the conversation: the text an assistant turn adds
after `render(messages[:i], add_generation_prompt=True)` is that turn and its end-of-turn
marker (weight 1); everything else, including the generation prompt, is context (weight 0).
That asks of a template the property every usable chat template has: the conversation so far
plus the generation prompt is a prefix of the conversation with the reply. The end-of-turn
marker (what generation stops at) is read off the template the same way.

Variables beyond those are the template's own: `ChatTemplate.with_names` passes `user_name`
and `assistant_name`, which templates that do not name speakers ignore.

Built-in templates, for models without chat tokens:
  play   "User:\n...", "Assistant:\n..." turns (speakers renamed by user_name and
         assistant_name), each ended by a blank line: Shakespeare's play layout, which a base
         model trained on the plays continues naturally; --mode=chat's layout before templates
  gpt2   "User: ...", "Assistant: ..." turns, each ended by <|endoftext|> (GPT-2 BPE)
  plain  the contents alone, each turn ended by a blank line: the play layout of the
         Shakespeare dialogue data ("SPEAKER: speech"), for char and byte vocabularies
"""

import dataclasses

import jinja2
import jinja2.sandbox
import numpy as np

from gptjax import storage
from gptjax.errors import UserError
from gptjax.tokenizer import EOT, Tokenizer

ROLES = ("system", "user", "assistant")

BUILTIN = {
  "play": (
    "{% set user = user_name | default('User') %}"
    "{% set assistant = assistant_name | default('Assistant') %}"
    "{% for m in messages %}"
    "{% if m.role == 'system' %}{{ m.content }}\n\n"
    "{% elif m.role == 'user' %}{{ user }}:\n{{ m.content }}\n\n"
    "{% else %}{{ assistant }}:\n{{ m.content }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ assistant }}:\n{% endif %}"
  ),
  "gpt2": (
    "{% for m in messages %}"
    "{% if m.role == 'system' %}{{ m.content }}<|endoftext|>"
    "{% elif m.role == 'user' %}User: {{ m.content }}<|endoftext|>"
    "{% else %}Assistant: {{ m.content }}<|endoftext|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
  ),
  "plain": "{% for m in messages %}{{ m.content }}\n\n{% endfor %}",
}

_PROBE = "\x00assistant reply\x00"  # a reply no template adds to or cuts


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """A compiled template; `name` is a built-in's name or the file it came from, `names` the
  extra variables every render sees (see with_names)."""

  name: str
  source: str
  names: dict = dataclasses.field(default_factory=dict, hash=False)

  def __post_init__(self):
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined)
    try:
      compiled = env.from_string(self.source)
    except jinja2.TemplateSyntaxError as e:
      raise UserError(
        f"chat template {self.name}: syntax error at line {e.lineno}: {e.message}"
      ) from None
    object.__setattr__(self, "_compiled", compiled)
    object.__setattr__(self, "end_of_turn", self._end_of_turn())

  def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
    try:
      return self._compiled.render(
        messages=messages, add_generation_prompt=add_generation_prompt, **self.names
      )
    except Exception as e:  # jinja2's errors and the template's own Python ones (1/0, "%d" % x)
      reason = str(e) if isinstance(e, jinja2.TemplateError) else f"{type(e).__name__}: {e}"
      raise UserError(f"chat template {self.name} failed to render: {reason}") from None

  def with_names(self, user: str, assistant: str) -> "ChatTemplate":
    """This template with the speakers named (for templates that name them, e.g. play)."""
    return dataclasses.replace(self, names={"user_name": user, "assistant_name": assistant})

  def spans(self, messages: list[dict]) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, trained) pieces: trained are the assistant turns
    (but those with weight 0) with their end-of-turn markers; joined, the pieces are
    render(messages)."""
    pieces, done = [], ""
    for i, message in enumerate(messages):
      if message["role"] == "assistant":
        context = self._extend(done, self.render(messages[:i], add_generation_prompt=True), i)
        pieces.append((context[len(done) :], False))
        done = context
      turn = self._extend(done, self.render(messages[: i + 1]), i)
      trained = message["role"] == "assistant" and message.get("weight", 1) != 0
      pieces.append((turn[len(done) :], trained))
      done = turn
    return [(text, trained) for text, trained in pieces if text]

  def _extend(self, done: str, text: str, i: int) -> str:
    if not text.startswith(done):
      raise UserError(
        f"chat template {self.name} does not render a conversation's first {i} turns as a "
        "prefix of the longer conversation (with and without the generation prompt), so "
        "replies cannot be told from context; make each turn's text depend only on that turn"
      )
    return text

  def _end_of_turn(self) -> str:
    """What the template puts after an assistant reply: generation stops there."""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
    reply = (self.spans(messages) or [("", False)])[-1]  # an empty template renders nothing
    if not reply[1] or _PROBE not in reply[0]:
      raise UserError(
        f"chat template {self.name} marks no assistant reply (rendering a user turn and an "
        "assistant turn adds no text for the assistant); render m.content for role 'assistant'"
      )
    end = reply[0].split(_PROBE, 1)[1]
    if not end:
      raise UserError(
        f"chat template {self.name} ends an assistant turn with nothing, so generation could "
        "never tell the reply is over; end it with <|endoftext|> or a fixed string"
      )
    return end

  def encode(self, messages: list[dict], tokenizer: Tokenizer, train_on_all: bool = False):
    """(ids int32, weights float32) of a conversation: weight 1 on the assistant turns and
    their end markers (on every token with train_on_all), 0 elsewhere.

    The ids are the whole rendered text's, as a prompt to the model would be; each piece's
    tokens are found as the tokens of the text up to its end, which must be a prefix."""
    spans = self.spans(messages)
    text = "".join(piece for piece, _ in spans)
    ids = encode_text(tokenizer, text)
    weights = np.full(len(ids), float(train_on_all), np.float32)
    start, offset = 0, 0
    for piece, trained in spans:
      offset += len(piece)
      prefix = encode_text(tokenizer, text[:offset]) if offset < len(text) else ids
      if not np.array_equal(ids[: len(prefix)], prefix):
        raise UserError(
          f"chat template {self.name}: the {tokenizer.kind} tokenizer merges tokens across "
          f"the end of {piece[-20:]!r}, so the reply's context is not a token prefix of the "
          "conversation; end the generation prompt and each turn where tokens end (e.g. no "
          "trailing space)"
        )
      if trained:
        weights[start : len(prefix)] = 1.0
      start = len(prefix)
    return ids, weights

  def prompt(self, messages: list[dict], tokenizer: Tokenizer) -> np.ndarray:
    """The ids that ask for the next assistant reply."""
    return encode_text(tokenizer, self.render(messages, add_generation_prompt=True))


def encode_text(tokenizer: Tokenizer, text: str) -> np.ndarray:
  """Tokens of text in which `<|endoftext|>` is the end-of-text id, for every tokenizer."""
  parts = text.split(EOT)
  out = []
  for i, part in enumerate(parts):
    if i:
      out.append(np.array([tokenizer.eot_id], np.int32))
    if part:
      out.append(tokenizer.encode(part))
  return np.concatenate(out).astype(np.int32) if out else np.zeros((0,), np.int32)


def decode_text(tokenizer: Tokenizer, ids) -> str:
  """encode_text's inverse: the end-of-text id becomes `<|endoftext|>`, as templates write it."""
  parts, part = [], []
  for t in list(ids) + [tokenizer.eot_id]:
    if t == tokenizer.eot_id:
      parts.append(tokenizer.decode(part) if part else "")
      part = []
    else:
      part.append(t)
  return EOT.join(parts)


SAVED = "chat_template.jinja"  # a run's own copy of a template file (WORKDIR/SAVED)


def save(name_or_path: str, directory: str) -> None:
  """Keeps a template file's text with the run that trained on it (once), so chat and
  evaluation render exactly what training did even if the file changes or goes; a
  built-in is saved by its name (in config.json)."""
  path = storage.join(directory, SAVED)
  if name_or_path in BUILTIN or storage.exists(path):
    return
  storage.write_text(path, load(name_or_path).source)


def load(name_or_path: str) -> ChatTemplate:
  """A built-in template by name, or a Jinja2 file."""
  if name_or_path in BUILTIN:
    return ChatTemplate(name_or_path, BUILTIN[name_or_path])
  path = storage.absolute(name_or_path)
  if not storage.isfile(path):
    raise UserError(
      f"chat template {name_or_path!r} is neither a built-in ({', '.join(BUILTIN)}) nor a "
      "file; pass one of those names or the path of a Jinja2 template"
    )
  try:
    with storage.open(path, encoding="utf-8") as f:
      return ChatTemplate(path, f.read())
  except UnicodeDecodeError as e:
    raise UserError(f"chat template {path} is not UTF-8 text ({e.reason})") from None

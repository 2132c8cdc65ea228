"""Chat templates: loss masks select exactly the assistant turns, the generation prompt is a
token prefix of the reply, and a broken template is one clear error."""

import os

import numpy as np
import pytest
from conftest import REPO

from gptjax import chat_template, task_data
from gptjax import tokenizer as tokenizer_lib
from gptjax.errors import UserError

DIALOGUE = os.path.join(REPO, "..", "shared", "data", "shakespeare_dialogue", "validation.jsonl")
SYSTEM = {"role": "system", "content": "You speak as in the plays."}


@pytest.fixture(scope="module")
def conversations():
  """The fixture's first 40 conversations, some with a system turn in front."""
  convs = task_data.read(DIALOGUE)[:40]
  return [[SYSTEM, *c] if i % 3 == 0 else c for i, c in enumerate(convs)]


@pytest.fixture(scope="module")
def tokenizers(conversations):
  """Every tokenizer kind, the trained ones trained on the conversations' text."""
  texts = [chat_template.BUILTIN["gpt2"] + m["content"] for c in conversations for m in c]
  return {
    "char": tokenizer_lib.CharTokenizer.train(texts + ["User: Assistant:\n"]),
    "byte": tokenizer_lib.ByteTokenizer(),
    "bpe": tokenizer_lib.BPETokenizer.train(texts, 400),
    "sentencepiece": tokenizer_lib.SentencePieceTokenizer.train(texts, 500),
  }


def _runs(mask):
  """Index arrays of the runs of True in mask."""
  edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
  return [np.arange(a, b) for a, b in zip(edges[::2], edges[1::2])]


@pytest.mark.parametrize("name", sorted(chat_template.BUILTIN))
def test_the_trained_tokens_are_exactly_the_assistant_turns(name, conversations, tokenizers):
  template = chat_template.load(name)
  for kind, tok in tokenizers.items():
    for messages in conversations:
      ids, weights = template.encode(messages, tok)
      # each reply with its end-of-turn marker, and nothing else
      want = [text for text, trained in template.spans(messages) if trained]
      replies = [m["content"] for m in messages if m["role"] == "assistant"]
      assert len(want) == len(replies)
      assert all(r in w and w.endswith(template.end_of_turn) for r, w in zip(replies, want))
      assert not any(m["content"] in "".join(want) for m in messages if m["role"] != "assistant")
      got = [tok.decode(ids[run]) for run in _runs(weights == 1)]
      assert [g.strip() for g in got] == [w.strip() for w in want], (kind, messages)
      assert set(np.unique(weights)) <= {0.0, 1.0} and weights.sum() > 0
      all_ids, all_weights = template.encode(messages, tok, train_on_all=True)
      np.testing.assert_array_equal(all_ids, ids)
      assert (all_weights == 1).all()


@pytest.mark.parametrize("name", sorted(chat_template.BUILTIN))
def test_the_generation_prompt_is_a_token_prefix_of_the_reply(name, conversations, tokenizers):
  template = chat_template.load(name)
  for kind, tok in tokenizers.items():
    for messages in conversations:
      prompt = template.prompt(messages[:-1], tok)
      whole = chat_template.encode_text(tok, template.render(messages))
      np.testing.assert_array_equal(whole[: len(prompt)], prompt, err_msg=f"{kind}")
      # the training ids are the whole conversation's ids: one tokenization for both
      np.testing.assert_array_equal(template.encode(messages, tok)[0], whole, err_msg=kind)


def test_end_of_turn_markers_and_endoftext_ids():
  assert chat_template.load("gpt2").end_of_turn == tokenizer_lib.EOT
  assert chat_template.load("plain").end_of_turn == "\n\n"
  tok = tokenizer_lib.ByteTokenizer()
  ids = chat_template.encode_text(tok, f"a{tokenizer_lib.EOT}b{tokenizer_lib.EOT}")
  assert ids.tolist() == [ord("a"), tok.eot_id, ord("b"), tok.eot_id]
  assert chat_template.decode_text(tok, ids) == f"a{tokenizer_lib.EOT}b{tokenizer_lib.EOT}"


def _old_chat_layout(messages, user="User", assistant="Assistant"):
  """--mode=chat's text before templates (chat.Template): what play must still render."""
  names = {"user": user, "assistant": assistant}
  turns = "".join(f"{names[m['role']]}:\n{m['content']}\n\n" for m in messages)
  return turns + f"{assistant}:\n"


def test_play_renders_the_old_chat_layout(conversations):
  play = chat_template.load("play")
  assert play.end_of_turn == "\n\n"
  for messages in conversations[1:3]:  # no system turn
    assert play.render(messages[:-1], add_generation_prompt=True) == _old_chat_layout(messages[:-1])
    named = play.with_names("ROMEO", "JULIET")
    want = _old_chat_layout(messages[:-1], "ROMEO", "JULIET")
    assert named.render(messages[:-1], add_generation_prompt=True) == want
  system = [SYSTEM, {"role": "user", "content": "hi"}]
  assert play.render(system) == "You speak as in the plays.\n\nUser:\nhi\n\n"


def test_play_names_change_the_prompt_and_leave_the_masks_to_the_replies():
  tok = tokenizer_lib.CharTokenizer("abcdefghijklmnopqrstuvwxyzUARJ:.\n ")
  messages = [
    {"role": "user", "content": "hail"},
    {"role": "assistant", "content": "well met"},
    {"role": "user", "content": "farewell"},
    {"role": "assistant", "content": "adieu"},
  ]
  for template in [chat_template.load("play"), chat_template.load("play").with_names("R", "J")]:
    speaker = template.names.get("assistant_name", "Assistant")
    prompt = template.prompt(messages[:-1], tok)
    whole = chat_template.encode_text(tok, template.render(messages))
    np.testing.assert_array_equal(whole[: len(prompt)], prompt)
    assert tok.decode(prompt).endswith(f"\n\n{speaker}:\n")
    ids, weights = template.encode(messages, tok)
    assert [tok.decode(ids[run]) for run in _runs(weights == 1)] == ["well met\n\n", "adieu\n\n"]
  plain = chat_template.load("plain").with_names("R", "J")  # a template without names
  assert plain.render(messages) == chat_template.load("plain").render(messages)


def test_a_template_from_a_file(tmp_path):
  path = tmp_path / "t.jinja"
  path.write_text(
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
  )
  template = chat_template.load(str(path))
  assert template.end_of_turn == "</assistant>\n"
  messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ho"}]
  assert template.spans(messages) == [
    ("<user>hi</user>\n", False),
    ("<assistant>", False),
    ("ho</assistant>\n", True),
  ]


@pytest.mark.parametrize(
  "source, fragment",
  [
    ("{% for m in messages %}{{ m.content }", "syntax error at line 1"),
    ("{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}\n{% endif %}{% endfor %}",
     "marks no assistant reply"),
    ("{% for m in messages %}{{ m.content }}{% endfor %}", "ends an assistant turn with nothing"),
    ("{{ messages | length }}{% for m in messages %}{{ m.content }}|{% endfor %}", "as a prefix"),
    ("{% for m in messages %}{{ m.nope }}{% endfor %}", "failed to render"),
    ("{{ 1 / 0 }}", "failed to render: ZeroDivisionError"),  # Python's errors, not jinja2's
    ("{{ '%d' % 'x' }}", "failed to render: TypeError"),
    ("", "marks no assistant reply"),  # an empty file renders nothing at all
  ],
)  # fmt: skip
def test_a_broken_template_is_one_clear_error(tmp_path, source, fragment):
  path = tmp_path / "bad.jinja"
  path.write_text(source)
  with pytest.raises(UserError, match=f"chat template {path}.*{fragment}"):
    chat_template.load(str(path))


def test_an_unknown_template_name_lists_the_built_ins():
  with pytest.raises(UserError, match="neither a built-in \\(play, gpt2, plain\\) nor a file"):
    chat_template.load("chatml")


def test_a_prompt_that_ends_inside_a_token_is_named(tmp_path, tokenizers):
  """A trailing space in the generation prompt: BPE merges it into the reply's first word, so
  prompting with it would ask for tokens the model never saw after it in training."""
  path = tmp_path / "space.jinja"
  path.write_text(
    "{% for m in messages %}{{ m.role }}: {{ m.content }}<|endoftext|>{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
  )
  template = chat_template.load(str(path))
  messages = [{"role": "user", "content": "Speak."}, {"role": "assistant", "content": "the end"}]
  template.encode(messages, tokenizers["char"])  # characters never merge
  with pytest.raises(UserError, match="bpe tokenizer merges tokens across the end of"):
    template.encode(messages, tokenizers["bpe"])

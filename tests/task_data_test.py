"""Task data: JSONL conversations in both record shapes, and every fault one line naming the
file and line."""

import json
import os

import pytest
from conftest import REPO

from gptjax import task_data
from gptjax.errors import UserError

DIALOGUE = os.path.join(REPO, "..", "shared", "data", "shakespeare_dialogue")


def test_the_dialogue_fixture_reads_whole():
  counts = {
    split: len(task_data.read(os.path.join(DIALOGUE, f"{split}.jsonl")))
    for split in ("train", "validation", "test")
  }
  assert counts == {"train": 6132, "validation": 424, "test": 487}
  first = task_data.read(os.path.join(DIALOGUE, "train.jsonl"))[0]
  assert first == [
    {"role": "user", "content": "First Citizen: Before we proceed any further, hear me speak."},
    {"role": "assistant", "content": "All: Speak, speak."},
  ]
  assert len(task_data.read(os.path.join(DIALOGUE, "*.jsonl"))) == sum(counts.values())


def test_prompt_completion_records_with_configured_fields(tmp_path):
  path = tmp_path / "qa.jsonl"
  path.write_text('{"q": "Who?", "a": "Romeo."}\n\n{"q": "Where?", "a": "Verona."}\n')
  assert task_data.read(str(path), prompt_field="q", completion_field="a") == [
    [{"role": "user", "content": "Who?"}, {"role": "assistant", "content": "Romeo."}],
    [{"role": "user", "content": "Where?"}, {"role": "assistant", "content": "Verona."}],
  ]


GOOD = '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}'


@pytest.mark.parametrize(
  "second_line, fragment",
  [
    ('{"messages": [', "data.jsonl:2: not valid JSON"),
    ('{"messages": [{"role": "narrator", "content": "x"}]}', "data.jsonl:2: turn 1: unknown role 'narrator'"),
    ('{"text": "x"}', "data.jsonl:2: a record needs \"messages\", or \"prompt\" and \"completion\" (it has 'text')"),
    ('{"messages": [{"role": "user"}]}', "data.jsonl:2: turn 1: a turn is an object with \"role\" and \"content\""),
    ('{"messages": [{"role": "user", "content": "x"}]}', "data.jsonl:2: the conversation has no assistant turn"),
    ('{"prompt": "x", "completion": 3}', "data.jsonl:2: \"completion\" must be a string"),
    ('[1, 2]', "data.jsonl:2: a record is a JSON object, not a list"),
  ],
)  # fmt: skip
def test_a_bad_record_names_its_file_and_line(tmp_path, second_line, fragment):
  path = tmp_path / "data.jsonl"
  path.write_text(GOOD + "\n" + second_line + "\n")
  with pytest.raises(UserError) as e:
    task_data.read(str(path))
  assert fragment in str(e.value) and str(path) in str(e.value)


def test_an_empty_file_or_no_file_is_named(tmp_path):
  (tmp_path / "empty.jsonl").write_text("\n")
  with pytest.raises(UserError, match="empty.jsonl holds no records"):
    task_data.read(str(tmp_path / "empty.jsonl"))
  with pytest.raises(UserError, match="no file matches"):
    task_data.read(str(tmp_path / "nothing*.jsonl"))


def test_a_directory_or_a_file_that_is_not_utf8_is_named(tmp_path):
  (tmp_path / "d").mkdir()
  with pytest.raises(UserError, match=r"is a directory; pass a JSONL file or a glob such as"):
    task_data.read(str(tmp_path / "d"))
  (tmp_path / "latin1.jsonl").write_bytes(
    b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "b"}\n'
  )
  with pytest.raises(UserError, match=r"latin1.jsonl:2: not UTF-8 text"):
    task_data.read(str(tmp_path / "latin1.jsonl"))


def test_records_keep_where_they_came_from(tmp_path):
  (tmp_path / "a.jsonl").write_text('{"prompt": "a", "completion": "b"}\n\n' * 2)
  records = task_data.read(str(tmp_path / "a.jsonl"))
  assert records.where == [f"{tmp_path / 'a.jsonl'}:1", f"{tmp_path / 'a.jsonl'}:3"]
  assert records.part(1, 2).where == records.where[1:]


def test_a_resume_that_would_move_the_validation_split_is_refused(tmp_path):
  """Without val_path the split is the last val_fraction of data.path: another fraction
  turns held-out records into training ones. A checkpoint of an older version, whose data
  identity lacks a key, still resumes."""
  from conftest import tiny_config

  from gptjax import data

  config = tiny_config(data__source="task", data__path="x.jsonl", data__chat_template="plain")
  saved = data.position(10, config)
  assert data.position_changes(saved, config, "W") == []
  config.data.val_fraction = 0.2
  with pytest.raises(UserError, match="trained on other data \\(val_fraction 0.1 -> 0.2\\)"):
    data.position_changes(saved, config, "W")
  del saved["source"]["val_fraction"]  # as an older version saved it
  assert data.position_changes(saved, config, "W") == []


def test_openai_fine_tuning_records_developer_role_and_weight_0(tmp_path):
  from gptjax import chat_template
  from gptjax.tokenizer import ByteTokenizer

  turns = [
    {"role": "developer", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello there.", "weight": 0},  # context only
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Farewell."},
  ]
  path = tmp_path / "ft.jsonl"
  path.write_text(json.dumps({"messages": turns}) + "\n")
  (messages,) = task_data.read(str(path))  # Records: a list of conversations
  assert messages[0]["role"] == "system" and messages[2]["weight"] == 0
  template, tok = chat_template.load("plain"), ByteTokenizer()
  ids, weights = template.encode(messages, tok)
  trained = tok.decode(ids[weights > 0].tolist())
  assert "Farewell." in trained and "Hello there" not in trained
  bad = [
    ('{"messages": [{"role": "user", "content": "ok \\ud83d"}, {"role": "assistant", "content": "x"}]}', "half a UTF-16 surrogate pair"),
    ('{"messages": [{"role": "user", "content": "a", "weight": 0}, {"role": "assistant", "content": "x"}]}', '"weight" is 0 or 1, on assistant turns only'),
  ]  # fmt: skip
  for line, fragment in bad:
    path.write_text(line + "\n")
    with pytest.raises(UserError, match=f"{path}:1: turn 1: .*{fragment}"):
      task_data.read(str(path))
  path.write_text(json.dumps({"messages": turns[:3]}) + "\n")  # its one reply weighs 0
  with pytest.raises(UserError, match=f"{path}:1: the conversation has no assistant turn \\(of weight 1\\)"):  # fmt: skip
    task_data.read(str(path))

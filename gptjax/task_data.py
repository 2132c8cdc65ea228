"""Task data for fine-tuning: JSONL files of conversations, read into message lists.

One JSON object per line, either shape:
  {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
  {"prompt": "...", "completion": "..."}   (field names configurable) -> a user turn and the
                                            assistant's reply
A conversation must hold at least one assistant turn (what fine-tuning learns). Every fault
is a UserError naming the file and line.
"""

import glob
import json
import os

from gptjax.chat_template import ROLES
from gptjax.errors import UserError


def read(pattern: str, prompt_field: str = "prompt", completion_field: str = "completion"):
  """Conversations (lists of {"role", "content"}) from a JSONL file or glob, in file order."""
  files = sorted(glob.glob(os.path.expanduser(pattern)))
  if not files:
    raise UserError(f"no file matches {pattern!r}; pass a JSONL file or a glob of them")
  out = []
  for path in files:
    start = len(out)
    with open(path, encoding="utf-8") as f:
      for number, line in enumerate(f, 1):
        if line.strip():
          out.append(_conversation(line, f"{path}:{number}", prompt_field, completion_field))
    if len(out) == start:
      raise UserError(f"{path} holds no records; one JSON object per line is expected")
  return out


def _conversation(line: str, where: str, prompt_field: str, completion_field: str) -> list:
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
  if not isinstance(record, dict):
    raise UserError(f"{where}: a record is a JSON object, not a {type(record).__name__}")
  if "messages" in record:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
      raise UserError(f'{where}: "messages" must be a non-empty list of turns')
    turns = [_turn(m, f"{where}: turn {i + 1}") for i, m in enumerate(messages)]
    if not any(t["role"] == "assistant" for t in turns):
      raise UserError(f"{where}: the conversation has no assistant turn, so nothing to learn")
    return turns
  if prompt_field in record and completion_field in record:
    turns = [("user", record[prompt_field]), ("assistant", record[completion_field])]
    return [_turn({"role": r, "content": c}, f"{where}: {r}") for r, c in turns]
  raise UserError(
    f'{where}: a record needs "messages", or "{prompt_field}" and "{completion_field}" '
    f"(it has {', '.join(map(repr, record)) or 'no fields'}); name other fields with the "
    "prompt/completion field settings"
  )


def _turn(message, where: str) -> dict:
  if not isinstance(message, dict) or "role" not in message or "content" not in message:
    raise UserError(f'{where}: a turn is an object with "role" and "content"')
  if message["role"] not in ROLES:
    raise UserError(f"{where}: unknown role {message['role']!r}; roles are {', '.join(ROLES)}")
  if not isinstance(message["content"], str):
    raise UserError(f'{where}: "content" must be a string')
  return {"role": message["role"], "content": message["content"]}

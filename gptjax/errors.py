"""The one exception type for mistakes a user can make (flags, configs, files).

main turns a UserError into a one-line message and exit code 1; anything else is a bug
and keeps its traceback.
"""

import os
import uuid


class UserError(Exception):
  """A bad input: the message names the bad value and how to fix it."""


def ensure_writable_dir(path: str, flag: str) -> None:
  """Creates `path` if needed and proves it writable, or names `flag` as the fix."""
  try:
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, f".write_test.{uuid.uuid4().hex}")  # hosts may share it
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise UserError(f"cannot write to {path!r} ({e.strerror}); pass a writable {flag}") \
        from None

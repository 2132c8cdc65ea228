"""The one exception type for mistakes a user can make (flags, configs, files).

main turns a UserError into a one-line message and exit code 1; anything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
  """A bad input: the message names the bad value and how to fix it."""

"""storage.py on a bucket (fake-gcs-server on 127.0.0.1, tests/gcs_emulator.py): directory
semantics, and refused reads and writes as one-line errors (a full local disk too). Local
paths are every other test's; the CLI on gs:// is gcs_test.py's."""

import errno
import os
import sys

import pytest
from gcs_emulator import BUCKET

from gptjax import cli, storage
from gptjax.errors import UserError


def test_storage_on_a_bucket_behaves_like_a_directory(gcs):
  root = f"gs://{BUCKET}/st"
  storage.makedirs(root)  # a no-op: a prefix exists once something is under it
  assert not storage.exists(root) and storage.listdir(root) == []
  storage.write_text(f"{root}/a/x.txt", "one")
  assert storage.isdir(f"{root}/a") and storage.isfile(f"{root}/a/x.txt")
  assert storage.read_text(f"{root}/a/x.txt") == "one"
  storage.move(f"{root}/a", f"{root}/b/a")  # the corrupt-checkpoint set-aside
  assert storage.listdir(root) == ["b"] and storage.read_text(f"{root}/b/a/x.txt") == "one"
  assert storage.glob(f"{root}/b/a/*.txt") == [f"{root}/b/a/x.txt"]
  with pytest.raises(ValueError, match="cannot be appended"):
    storage.open(f"{root}/b/a/x.txt", "a")
  storage.rmtree(f"{root}/b")
  assert not storage.exists(f"{root}/b")


def test_a_refused_write_is_one_line(gcs, monkeypatch):
  """No permission: the emulator grants every write, so gcsfs's upload answers 403 here."""
  import gcsfs
  from gcsfs.retry import HttpError

  calls = gcsfs.core.GCSFileSystem._call

  async def forbidden(self, method, path, *args, **kwargs):
    if method in ("POST", "PUT"):  # every upload
      raise HttpError({"code": 403, "message": "caller does not have storage.objects.create"})
    return await calls(self, method, path, *args, **kwargs)

  monkeypatch.setattr(gcsfs.core.GCSFileSystem, "_call", forbidden)
  with pytest.raises(UserError, match="cannot write to 'gs://test-bucket/ro'.*403"):
    storage.ensure_writable_dir(f"gs://{BUCKET}/ro", "--workdir")
  from gptjax.metrics import MetricWriter  # refused later in a run: still one line

  with pytest.raises(UserError, match="cannot write gs://test-bucket/ro/metrics.jsonl.*403"):
    MetricWriter(f"gs://{BUCKET}/ro")

  async def unreadable(self, method, path, *args, **kwargs):
    raise HttpError({"code": 403, "message": "caller does not have storage.objects.get"})

  monkeypatch.setattr(gcsfs.core.GCSFileSystem, "_call", unreadable)
  with pytest.raises(UserError, match="cannot read gs://test-bucket/x/config.json .*403"):
    storage.exists(f"gs://{BUCKET}/x/config.json")


def test_a_full_disk_under_any_write_is_one_line_and_leaves_no_temporary(
  tmp_path, monkeypatch, capsys
):
  """A resume on a nearly full disk failed at metrics.jsonl's rewrite with a traceback, and
  left a half-written temporary beside it."""
  target = tmp_path / "metrics.jsonl"

  def full(*_):  # as write() and close() raise it: naming no file
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(os, "replace", full)
  monkeypatch.setattr(sys, "argv", ["gptjax"])
  with pytest.raises(SystemExit) as exit_:
    cli.run(lambda argv: storage.write_text(str(target), "{}\n"), "gptjax")
  assert exit_.value.code == 1 and list(tmp_path.iterdir()) == []
  assert capsys.readouterr().err == (
    f"gptjax: error: no space left on the device writing {target}; free some, or use another disk\n"
  )

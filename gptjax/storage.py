"""Every path a run reads or writes, local or on Cloud Storage (gs://), through one layer.

A local path goes to os, shutil and open exactly as before. A URL (gs://bucket/x) goes to
etils.epath over fsspec's gcsfs, the layer orbax itself uses for its metadata, so a workdir
on a bucket holds the same files as a local one. gptjax sets EPATH_USE_TF=false (in
gptjax/__init__.py): with TensorFlow installed etils would otherwise route gs:// through
tf.io.gfile, a second client with its own endpoint, so runs with and without TF (and the
tests, against an emulator) would differ.

Object stores are not filesystems, and callers rely on these differences being handled here:
there is no append (`open(url, "a")` is refused: write the whole object), a directory is a
prefix (makedirs is a no-op, an empty one does not exist), and a move is a copy and a delete.
"""

import builtins
import functools
import glob as _glob
import json
import os
import shutil
import tempfile
import uuid

from gptjax.errors import UserError, describe

GCS_PACKAGES = "gcsfs google-cloud-storage"


def is_url(path) -> bool:
  return "://" in str(path)


def _on_a_bucket(fn):
  """A bucket that refuses a read (no permission, no credentials, a network error) is a
  one-line UserError naming the URL; a missing object stays FileNotFoundError."""

  @functools.wraps(fn)
  def checked(path, *args, **kwargs):
    if not is_url(path):
      return fn(path, *args, **kwargs)
    try:
      return fn(path, *args, **kwargs)
    except (FileNotFoundError, UserError, ValueError):
      raise
    except Exception as e:  # gcsfs's HttpError is no OSError
      raise UserError(
        f"cannot read {path} ({describe(e)}); check the bucket's name and your credentials "
        "(gcloud auth application-default login)"
      ) from None

  return checked


def _epath(path):
  """An etils Path for a URL; a one-line error when its scheme's packages are missing."""
  try:
    import gcsfs  # noqa: F401  (what epath uses for gs:// without TensorFlow)
    from etils import epath
  except ImportError:
    raise UserError(
      f"{path} is on Cloud Storage, which needs the GCS packages; pip install -e '.[gcs]' "
      f"(or pip install {GCS_PACKAGES})"
    ) from None
  return epath.Path(path)


def absolute(path) -> str:
  """`~` expanded and absolute; a URL as it is."""
  return str(path) if is_url(path) else os.path.abspath(os.path.expanduser(path))


def join(path, *parts) -> str:
  return os.path.join(str(path), *parts)


@_on_a_bucket
def exists(path) -> bool:
  return _epath(path).exists() if is_url(path) else os.path.exists(path)


@_on_a_bucket
def isdir(path) -> bool:
  return _epath(path).is_dir() if is_url(path) else os.path.isdir(path)


@_on_a_bucket
def isfile(path) -> bool:
  if not is_url(path):
    return os.path.isfile(path)
  p = _epath(path)
  return p.exists() and not p.is_dir()


@_on_a_bucket
def listdir(path) -> list[str]:
  """Names in a directory (on a bucket: under a prefix); [] when there is none."""
  if not is_url(path):
    return os.listdir(path) if os.path.isdir(path) else []
  p = _epath(path)
  return [c.name for c in p.iterdir()] if p.is_dir() else []


@_on_a_bucket
def glob(pattern) -> list[str]:
  """Sorted matches of a glob (`~` expanded; on a bucket, `*` in the last part only)."""
  if not is_url(pattern):
    return sorted(_glob.glob(os.path.expanduser(pattern)))
  head, _, tail = str(pattern).rpartition("/")
  base = _epath(head)
  return sorted(str(p) for p in base.glob(tail)) if base.is_dir() else []


def makedirs(path) -> None:
  if is_url(path):
    return  # a bucket has no directories: a prefix exists once an object is under it
  os.makedirs(path, exist_ok=True)


def open(path, mode="r", **kwargs):  # noqa: A001  (the builtin's name: a drop-in)
  if not is_url(path):
    return builtins.open(path, mode, **kwargs)
  if "a" in mode or "+" in mode:
    raise ValueError(f"{path}: objects cannot be appended to or updated; write them whole")
  return _epath(path).open(mode, **kwargs)


@_on_a_bucket
def read_text(path) -> str:
  with open(path, encoding="utf-8") as f:
    return f.read()


def read_json(path):
  """A JSON file's value; one cut short (a crash mid-write) or corrupt is a one-line error
  naming it, not a traceback."""
  try:
    return json.loads(read_text(path))
  except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
    raise UserError(
      f"{path} is not readable JSON ({describe(e)}); a crash may have cut it short: restore "
      "it from a copy, or delete it if it is a record that a rerun writes again"
    ) from None


def write_text(path, text: str) -> None:
  """Whole or not at all: a local file via a temporary and a rename; an object is only
  visible once its upload completes."""
  if is_url(path):
    _epath(path).write_text(text)
    return
  tmp = f"{path}.{uuid.uuid4().hex}.tmp"  # hosts sharing a directory never collide
  try:
    with builtins.open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException as e:  # a full disk: no half-written temporary left to fill it further
    if os.path.exists(tmp):
      os.remove(tmp)
    if isinstance(e, OSError) and not e.filename:  # write() and close() name no file
      raise OSError(e.errno, e.strerror, path) from e
    raise


def remove(path) -> None:
  if is_url(path):
    _epath(path).unlink(missing_ok=True)
  elif os.path.exists(path):
    os.remove(path)


def rmtree(path) -> None:
  if is_url(path):
    p = _epath(path)
    if p.exists():
      p.rmtree()
    return
  shutil.rmtree(path, ignore_errors=True)


def move(src, dest) -> None:
  """A file or directory to dest (whose parent is made); on a bucket, copies then deletes."""
  if not is_url(src) and not is_url(dest):
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    shutil.move(src, dest)
    return
  fs, src_key = _fs(src)  # copy, then delete (gcsfs's mv tries a moveTo call first that
  fs.copy(src_key, _fs(dest)[1], recursive=True)  # buckets without a hierarchical
  fs.rm(src_key, recursive=True)  # namespace refuse, with a logged traceback)


def copy(src, dest) -> None:
  if not is_url(src) and not is_url(dest):
    shutil.copy(src, dest)
    return
  _epath(src if is_url(src) else dest)  # the packages' check
  from etils import epath

  epath.Path(src).copy(epath.Path(dest), overwrite=True)


def download(src, dest) -> None:
  """A file (local or on a bucket) to the local path dest, atomically."""
  tmp = f"{dest}.{uuid.uuid4().hex}.tmp"
  if is_url(src):
    fs, key = _fs(src)
    fs.get_file(key, tmp)
  else:
    shutil.copyfile(src, tmp)
  os.replace(tmp, dest)


def local_copy(path, fetch: bool = True) -> str:
  """A local path for path, for libraries that take only local file names: path itself, or
  a file in a new temporary directory (holding path's contents when fetch)."""
  if not is_url(path):
    return path
  dest = os.path.join(tempfile.mkdtemp(prefix="gptjax-"), os.path.basename(str(path)))
  if fetch:
    download(path, dest)
  return dest


def upload(src, dest) -> None:
  """The local file src to dest (a URL or a local path)."""
  if not is_url(dest):
    download(src, dest)
    return
  fs, key = _fs(dest)
  fs.put_file(src, key)


@_on_a_bucket
def version(path) -> tuple:
  """(size, a stamp that changes when the file does): a file's mtime, an object's generation."""
  if not is_url(path):
    return os.path.getsize(path), os.path.getmtime(path)
  fs, key = _fs(path)
  info = fs.info(key)
  return int(info["size"]), str(info.get("generation") or info.get("updated") or info.get("etag"))


@_on_a_bucket
def size(path) -> int:
  """Bytes of a file, or of everything under a directory."""
  if is_url(path):
    fs, key = _fs(path)
    return int(fs.du(key)) if fs.isdir(key) else int(fs.size(key))
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def _fs(url):
  """The fsspec filesystem behind a URL (the very instance etils, and so orbax, uses: its
  listing cache must see our moves and deletes), and the URL's key in it."""
  p = _epath(url)
  fs = p._backend.fs(str(p))
  return fs, fs._strip_protocol(str(url))


@_on_a_bucket
def read_versioned(url) -> tuple[str | None, int]:
  """(text, generation) of an object on a bucket; (None, 0) when there is none."""
  blob = _bucket(url).get_blob(_key(url))
  return (None, 0) if blob is None else (blob.download_as_text(), int(blob.generation))


def write_if(url, text: str, generation: int) -> int | None:
  """Writes an object only if its generation is still `generation` (0: it must not exist),
  the compare-and-swap buckets offer; its new generation, or None when another writer
  came first."""
  from google.api_core.exceptions import PreconditionFailed

  blob = _bucket(url).blob(_key(url))
  try:
    blob.upload_from_string(text, if_generation_match=generation)
  except PreconditionFailed:
    return None
  return int(blob.generation)


def delete_if(url, generation: int) -> None:
  """Deletes an object if it is still at `generation` (someone else's is left alone)."""
  from google.api_core.exceptions import NotFound, PreconditionFailed

  try:
    _bucket(url).blob(_key(url)).delete(if_generation_match=generation)
  except (NotFound, PreconditionFailed):
    pass


def _key(url) -> str:
  return str(url).split("://", 1)[1].partition("/")[2]


def _bucket(url):
  _epath(url)  # the packages' check
  from google.cloud import storage as gcs  # the gcs extra; its client has preconditions

  global _CLIENT
  if _CLIENT is None:
    _CLIENT = gcs.Client()
  return _CLIENT.bucket(str(url).split("://", 1)[1].partition("/")[0])


_CLIENT = None


def ensure_writable_dir(path, flag: str) -> None:
  """Creates `path` if needed and proves it writable by writing a probe (on a bucket, an
  object: a missing bucket or a refused write shows here, not at the first checkpoint)."""
  if not is_url(path) and os.path.exists(path) and not os.path.isdir(path):
    raise UserError(
      f"{flag}={path} is a file, not a directory; pass a directory (it is created if missing)"
    )
  probe = join(path, f".write_test.{uuid.uuid4().hex}")  # hosts may share the directory
  try:
    makedirs(path)
    with open(probe, "w") as f:
      f.write("ok")
    remove(probe)
  except Exception as e:  # OSError locally; gcsfs raises its own HttpError too
    if not is_url(path) and os.path.exists(probe):  # a full disk: created, never written
      os.remove(probe)
    reason = getattr(e, "strerror", None) or describe(e)
    raise UserError(f"cannot write to {path!r} ({reason}); pass a writable {flag}") from None

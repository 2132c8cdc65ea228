"""TFDS text datasets: the builder (downloaded once, or prepared offline from manual_dir)
and each split's documents. TensorFlow is imported here only, when a TFDS source is used."""

import contextlib
import io
import logging as std_logging
import os
import sys

from absl import logging

from gptjax.errors import UserError


def builder(data_config):
  """The prepared TFDS builder: downloaded once, or built from manual_dir offline."""
  loud = logging.level_info()  # --verbosity=0 (or more) shows TensorFlow's and TFDS's chatter
  if not loud:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # TF logs its oneDNN notice before it reads the level above; TF only reads files here.
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  try:
    import tensorflow as tf
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise UserError(
      f"TFDS dataset {data_config.tfds_name!r} needs TensorFlow Datasets, which is not "
      f'installed ({e.name} missing): pip install -e ".[tfds]", or train on local text with '
      "--config.data.source=text --config.data.path=FILE"
    ) from None
  if not loud:
    tfds.disable_progress_bar()
    std_logging.getLogger("urllib3").setLevel(std_logging.ERROR)  # "Retrying ..." offline
  tf.config.set_visible_devices([], "GPU")  # TF only reads data; the accelerators are JAX's
  try:
    found = tfds.builder(data_config.tfds_name, data_dir=data_config.data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise UserError(
      f"TFDS has no dataset {data_config.tfds_name!r}; check --config.data.tfds_name"
    ) from None
  if data_config.manual_dir and not os.path.isdir(data_config.manual_dir):
    raise UserError(f"config.data.manual_dir={data_config.manual_dir!r} is not a directory")
  download = (
    tfds.download.DownloadConfig(manual_dir=data_config.manual_dir)
    if data_config.manual_dir
    else None
  )
  from tensorflow_datasets.core.download import downloader

  # One try first: offline, TFDS's 10 retries wait ~3.5 min to say a name does not resolve.
  retries = (
    downloader.MAX_RETRIES if data_config.download_retries is None else data_config.download_retries
  )
  if not tf.io.gfile.exists(os.path.join(found.data_dir, "dataset_info.json")):
    where = f"from {data_config.manual_dir}" if data_config.manual_dir else "(downloading)"
    print(f"preparing TFDS dataset {found.name} {where}, once", file=sys.stderr, flush=True)
  for attempt_retries in (min(1, retries), retries):
    downloader.MAX_RETRIES = attempt_retries
    try:
      # TFDS prints its notes on stdout, which carries results only: they go to stderr.
      with contextlib.redirect_stdout(sys.stderr if loud else io.StringIO()):
        found.download_and_prepare(download_config=download)
      return found
    except Exception as e:  # network, checksum or manual-file failures all end the same way
      offline = any(m in str(e) for m in _OFFLINE)
      if offline or attempt_retries == retries:
        raise UserError(_cannot_prepare(data_config, e, offline)) from None
  return found


# What a download says when there is no network (then retrying cannot help).
_OFFLINE = ("NameResolutionError", "Temporary failure in name resolution", "Network is unreachable")


def _cannot_prepare(data_config, e: Exception, offline: bool) -> str:
  """One complete line: the dataset, why, and what to pass instead."""
  name = data_config.tfds_name
  if offline:
    reason = "no network: the download's host name does not resolve"
  else:
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    reason = first if len(first) <= 200 else first[:200].rsplit(" ", 1)[0] + " ..."
  files = (
    "the folder holding input.txt"
    if name == "tiny_shakespeare"
    else f"a folder holding the files TFDS downloads for {name} (its catalog page lists them)"
  )
  return (
    f"cannot download or prepare TFDS dataset {name!r} ({reason}); pass "
    f"--config.data.manual_dir=DIR ({files}), or train on local text with "
    "--config.data.source=text --config.data.path=FILE"
  )


def docs(builder, data_config, split: str):
  """A re-iterable source of split's documents (strings): "train" or "val"."""
  name = data_config.train_split if split == "train" else data_config.val_split
  if name not in builder.info.splits:
    raise UserError(
      f"TFDS dataset {data_config.tfds_name!r} has no split {name!r} (it has "
      f"{', '.join(builder.info.splits)}); set --config.data.{split}_split"
    )
  if data_config.text_feature not in builder.info.features:
    raise UserError(
      f"TFDS dataset {data_config.tfds_name!r} has no feature {data_config.text_feature!r} (it has "
      f"{', '.join(builder.info.features)}); set --config.data.text_feature"
    )

  def docs():
    import tensorflow_datasets as tfds

    ds = builder.as_dataset(split=name, shuffle_files=False)
    for example in tfds.as_numpy(ds):
      yield example[data_config.text_feature].decode("utf-8")

  return docs

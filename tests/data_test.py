import os
import sys

import numpy as np
import pytest
from conftest import (
  ONE_DEVICE,
  SHAKESPEARE_DIR,
  one_line_error,
  run_cli,
  run_cli_on_tmpfs,
  tiny_config,
)

from gptjax import data, tfds_data
from gptjax import tokenizer as tokenizer_lib
from gptjax.errors import UserError


def _load(tmp_path, **overrides):
  workdir = tmp_path / "work"
  workdir.mkdir(exist_ok=True)
  return data.load(tiny_config(**overrides), str(workdir))


def test_batches_are_a_function_of_seed_and_step(tmp_path, corpus):
  d = _load(tmp_path, data__path=corpus)
  b = d.train[7]
  assert b.shape == (8, 33) and b.dtype == np.int32
  np.testing.assert_array_equal(b, d.train[7])
  again = _load(tmp_path, data__path=corpus)  # a fresh process sees the same batches
  np.testing.assert_array_equal(b, again.train[7])
  assert not np.array_equal(b, d.train[8])
  other_seed = data.Batches(d.train.tokens, 8, 32, seed=1, split="train")
  assert not np.array_equal(b, other_seed[7])
  np.testing.assert_array_equal(d.train.get(7, rows=slice(2, 4)), b[2:4])


def test_an_epoch_visits_every_window_once():
  tokens = np.arange(1000)
  b = data.Batches(tokens, batch_size=7, seq_len=10, seed=3, split="train")
  assert b.windows_per_epoch == 99
  steps = -(-b.windows_per_epoch // 7)
  starts = np.concatenate([b.starts(s) for s in range(steps)])[: b.windows_per_epoch]
  phase = starts[0] % 10
  assert sorted(starts) == list(range(phase, phase + 990, 10))  # a permutation of the windows
  later = np.concatenate([b.starts(s) for s in range(steps, 2 * steps)])
  assert not np.array_equal(later[:20], starts[:20])  # the next epoch has a new order


def test_windows_are_contiguous_text(tmp_path, corpus):
  d = _load(tmp_path, data__path=corpus)
  text = open(corpus).read()
  for row in d.train[3]:
    assert d.tokenizer.decode(row) in text


def test_text_split_and_tokenizer_saved(tmp_path, corpus):
  d = _load(tmp_path, data__path=corpus, data__val_fraction=0.25)
  n = len(open(corpus).read())
  assert len(d.train.tokens) == int(n * 0.75) + 1  # + EOT
  assert len(d.val.tokens) == n - int(n * 0.75) + 1
  assert not os.path.exists(tmp_path / "work" / "tokenizer.json")  # saved once training starts
  data.save_tokenizer(d.tokenizer, str(tmp_path / "work"))
  assert (
    data.load(
      tiny_config(data__path=corpus, data__val_fraction=0.25), str(tmp_path / "work")
    ).tokenizer.to_dict()
    == d.tokenizer.to_dict()
  )
  assert d.val_bytes_per_token == pytest.approx(1.0, abs=0.01)


def test_glob_of_files(tmp_path):
  for i in range(3):
    (tmp_path / f"part{i}.txt").write_text(f"document {i} " * 50)
  d = _load(tmp_path, data__path=str(tmp_path / "part*.txt"))
  assert d.tokenizer.decode(d.train.tokens[:10]) == "document 0"


def test_missing_empty_and_short_corpora(tmp_path):
  with pytest.raises(UserError, match=r"no file matches config.data.path='\S*/nope.txt'"):
    _load(tmp_path, data__path=str(tmp_path / "nope.txt"))
  (tmp_path / "empty.txt").write_text("")
  with pytest.raises(UserError, match=r"config.data.path='\S*/empty.txt' is empty"):
    _load(tmp_path, data__path=str(tmp_path / "empty.txt"))
  (tmp_path / "short.txt").write_text("too short for a window of 33 tokens" * 2)
  with pytest.raises(UserError, match=r"fewer than one window of block_size\+1=33"):
    _load(tmp_path, data__path=str(tmp_path / "short.txt"))


@pytest.mark.slow
def test_tfds_tiny_shakespeare_offline(tmp_path, monkeypatch):
  source = dict(
    data__source="tfds",
    data__tfds_name="tiny_shakespeare",
    data__data_dir=str(tmp_path / "tfds"),
    data__manual_dir=SHAKESPEARE_DIR,
  )
  d = _load(tmp_path, **source)
  assert len(d.train.tokens) == 1_003_854 + 1 and len(d.val.tokens) == 55_770 + 1
  assert d.tokenizer.vocab_size == 66  # 65 characters + end-of-text
  assert d.tokenizer.decode(d.train.tokens[:14]) == "First Citizen:"
  # A bad split name fails before the train split is read (TFDS opens at first use).
  bad = tmp_path / "bad"
  with pytest.raises(UserError, match="has no split 'valdation'"):
    data.load(tiny_config(**source, data__val_split="valdation"), str(bad))
  assert not (bad / "data").exists()
  # A resume reads the workdir's vocabulary (saved after a first step) and token files: no
  # TensorFlow (~4.5 s) at all.
  data.save_tokenizer(d.tokenizer, str(tmp_path / "work"))
  for module in ("tensorflow", "tensorflow_datasets"):
    monkeypatch.setitem(sys.modules, module, None)  # an import of either now fails
  again = _load(tmp_path, **source)
  np.testing.assert_array_equal(again.train.tokens, d.train.tokens)


@pytest.mark.slow
def test_preparing_a_tfds_dataset_is_quiet(tmp_path):
  """TensorFlow's and TFDS's chatter (oneDNN notices, progress bars, "Downloading and
  preparing" on stdout) stays out without --verbosity: one note on stderr, the log on stdout."""
  proc = run_cli(
    "--config=experiments/tiny.py",
    f"--workdir={tmp_path / 'w'}",
    "--config.data.source=tfds",
    "--config.data.tfds_name=tiny_shakespeare",
    f"--config.data.data_dir={tmp_path / 'tfds'}",
    f"--config.data.manual_dir={SHAKESPEARE_DIR}",
    "--config.train.num_steps=2",
    env=ONE_DEVICE,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  note = f"preparing TFDS dataset tiny_shakespeare from {SHAKESPEARE_DIR}, once"
  assert proc.stderr.strip() == note, proc.stderr[-2000:]
  assert "Downloading" not in proc.stdout and "step 2/2" in proc.stdout, proc.stdout


def test_tfds_without_tensorflow_names_the_extra(tmp_path, monkeypatch):
  """TFDS is the `tfds` extra: a base install without it gets the command that adds it."""
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # what a failed import sees
  with pytest.raises(UserError, match=r'needs TensorFlow Datasets.*pip install -e "\.\[tfds\]"'):
    _load(tmp_path, data__source="tfds", data__tfds_name="tiny_shakespeare")


def test_tfds_download_failure_names_manual_dir(tmp_path):
  from tensorflow_datasets.core.download import downloader

  default_retries = downloader.MAX_RETRIES
  try:
    with pytest.raises(UserError, match="manual_dir"):  # offline here; no retries: fails fast
      _load(
        tmp_path,
        data__source="tfds",
        data__tfds_name="tiny_shakespeare",
        data__data_dir=str(tmp_path / "tfds"),
        data__download_retries=0,
      )
  finally:
    downloader.MAX_RETRIES = default_retries


def test_tfds_unknown_dataset(tmp_path):
  with pytest.raises(UserError, match="no dataset 'no_such_dataset'"):
    _load(
      tmp_path,
      data__source="tfds",
      data__tfds_name="no_such_dataset",
      data__data_dir=str(tmp_path / "tfds"),
    )


@pytest.mark.slow
def test_a_run_that_fails_before_training_leaves_no_vocabulary(tmp_path):
  (tmp_path / "short.txt").write_text("too short for a window of 33 tokens" * 2)
  line = one_line_error(
    run_cli(
      "--config=experiments/tiny.py",
      f"--workdir={tmp_path}/w",
      f"--config.data.path={tmp_path}/short.txt",
      env=ONE_DEVICE,
    )
  )
  assert "fewer than one window" in line
  assert not os.path.exists(tmp_path / "w" / "tokenizer.json")


def test_a_stale_vocabulary_is_named(tmp_path, corpus):
  """A tokenizer.json an earlier run left (another corpus) is named as the culprit."""
  (tmp_path / "w").mkdir()
  tokenizer_lib.save(tokenizer_lib.CharTokenizer("abc "), str(tmp_path / "w" / "tokenizer.json"))
  with pytest.raises(UserError) as e:
    data.load(tiny_config(data__path=corpus), str(tmp_path / "w"))
  line = str(e.value)
  assert "is not in the char vocabulary" in line
  assert f"of {tmp_path}/w/tokenizer.json, which an earlier run" in line
  assert "tokenizer=byte" not in line


@pytest.mark.slow
def test_tokenizing_on_a_full_disk_is_one_line_and_leaves_no_temporary_file(tmp_path):
  disk, left = tmp_path / "disk", tmp_path / "left"
  left.mkdir()
  text = tmp_path / "corpus.txt"
  with open(os.path.join(SHAKESPEARE_DIR, "input.txt")) as f:
    text.write_text(f.read(60000))
  proc = run_cli_on_tmpfs(
    disk,
    "80k",
    "--config=experiments/tiny.py",
    f"--workdir={disk}/w",
    f"--config.data.path={text}",
    env=ONE_DEVICE,
    copy_to=left,
  )
  line = one_line_error(proc)
  assert f"disk full writing the train tokens to {disk}/w/data/train.bin" in line
  assert "it needs up to 105.5 KiB" in line and "is free" in line  # 54k chars, uint16
  assert os.listdir(left / "w" / "data") == []


def test_a_dataset_that_cannot_be_prepared_is_one_complete_line():
  config = tiny_config(data__source="tfds", data__tfds_name="lm1b")
  offline = tfds_data._cannot_prepare(config.data, OSError("NameResolutionError(...)"), True)
  assert "'lm1b' (no network: the download's host name does not resolve)" in offline
  assert "files TFDS downloads for lm1b" in offline and "input.txt" not in offline
  long = OSError("HTTPSConnectionPool(host='x', port=443): " + "word " * 60)
  line = tfds_data._cannot_prepare(config.data, long, False)
  assert "word ...);" in line and "\n" not in line  # cut between words, said to be cut
  config.data.tfds_name = "tiny_shakespeare"
  assert "the folder holding input.txt" in tfds_data._cannot_prepare(config.data, long, False)

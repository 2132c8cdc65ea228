"""--mode=evaluate: strided text loss, packed task loss, generated replies, and the CLI."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, one_line_error, run_cli, tiny_config

from gptjax import chat_template, evaluation, inference, packing
from gptjax.errors import UserError
from gptjax.loss import cross_entropy
from gptjax.model import GPT, GPTConfig
from gptjax.tokenizer import CharTokenizer

BLOCK = 32  # the tiny model's context
DIALOGUE = os.path.normpath(
  os.path.join(REPO, "..", "shared", "data", "shakespeare_dialogue", "validation.jsonl")
)
CONVERSATIONS = [
  [{"role": "user", "content": "one two"}, {"role": "assistant", "content": "three four"}],
  [
    {"role": "system", "content": "count"},
    {"role": "user", "content": "five"},
    {"role": "assistant", "content": "six seven eight"},
  ],
  [{"role": "user", "content": "two"}, {"role": "assistant", "content": "three"}],
  [  # longer than the context: keeps its end
    {"role": "user", "content": "one two three four five six seven eight " * 2},
    {"role": "assistant", "content": "one two three four five six seven eight"},
  ],
  [{"role": "user", "content": "eight"}, {"role": "assistant", "content": "one two"}],
]


@pytest.fixture(scope="module")
def loaded():
  """A randomly initialised tiny model with a char vocabulary: scores need no training."""
  tok = CharTokenizer.train(["abcdefghijklmnopqrstuvwxyz .\n"])
  config = tiny_config()
  model = GPT(GPTConfig.from_config(config.model, tok.vocab_size))
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, BLOCK), jnp.int32))["params"]
  params = jax.tree.map(lambda x: x.value, params, is_leaf=lambda x: hasattr(x, "value"))
  return inference.Loaded(model, params, tok, "random init", config)


def _plain_losses(loaded, sequences):
  """Per-target nats of each sequence, run alone (no packing): right-padded to one shape,
  which a causal model never sees before the padding."""
  tokens = np.zeros((len(sequences), BLOCK + 1), np.int32)
  for i, ids in enumerate(sequences):
    tokens[i, : len(ids)] = ids
  forward = jax.jit(lambda p, t: loaded.model.apply({"params": p}, t[:, :-1]))
  logits = forward(loaded.params, tokens)
  losses = np.asarray(cross_entropy(logits, tokens[:, 1:], loaded.model.cfg.vocab_size))
  return [losses[i, : len(ids) - 1] for i, ids in enumerate(sequences)]


def _text(tmp_path, n_chars=300):
  words = "one two three four five six seven eight".split()
  text = " ".join(words[i % 8] for i in range(200))[:n_chars]
  (tmp_path / "held_out.txt").write_text(text)
  return str(tmp_path / "held_out.txt"), text


def test_windows_score_every_token_after_the_first_once():
  for n, stride in [(100, 16), (100, 32), (100, 1), (33, 8), (70, 7), (34, 32)]:
    hits = np.zeros(n, int)
    for start, first, end in evaluation.windows(n, BLOCK, stride):
      assert 0 <= first < end <= BLOCK and start + end <= n - 1
      hits[start + 1 + first : start + 1 + end] += 1
      assert first == (BLOCK - stride if start else 0)  # as much context as the stride leaves
    assert hits[0] == 0 and (hits[1:] == 1).all(), (n, stride)


def test_strided_loss_at_stride_block_is_the_mean_over_non_overlapping_windows(tmp_path, loaded):
  path, text = _text(tmp_path)
  ids = loaded.tokenizer.encode(text)
  out = evaluation.text_loss(loaded, path, BLOCK, batch=4)
  losses = _plain_losses(loaded, [ids[s : s + BLOCK + 1] for s in range(0, len(ids) - 1, BLOCK)])
  assert out["tokens"] == len(ids) - 1 == sum(len(l) for l in losses)
  assert out["windows"] == len(losses) and "examples" not in out
  assert out["loss"] == pytest.approx(np.concatenate(losses).mean(), abs=1e-5)
  assert out["bits_per_byte"] == pytest.approx(out["loss"] / np.log(2), rel=1e-6)  # 1 byte/char
  strided = evaluation.text_loss(loaded, path, 5, batch=4)
  assert strided["tokens"] == len(ids) - 1 and strided["windows"] > out["windows"]
  assert np.isfinite(strided["loss_stderr"]) and strided["loss_stderr"] > 0


def test_packed_task_loss_per_example_equals_an_unpacked_forward_pass(loaded):
  template = chat_template.load("plain")
  examples = evaluation.encode_all(template, CONVERSATIONS, loaded.tokenizer, "test.jsonl")
  tokens, _, _, _ = evaluation.pack_rows(examples, BLOCK)
  assert len(tokens) < len(examples)  # several examples share a row
  sums, counts = evaluation.example_losses(loaded, examples, batch=2)
  assert len(examples[3][0]) > BLOCK + 1
  fitted = [
    packing.cut(ids, w, BLOCK + 1) if len(ids) > BLOCK + 1 else (ids, w) for ids, w in examples
  ]
  alone = _plain_losses(loaded, [ids for ids, _ in fitted])
  for (_, weights), plain, total, count in zip(fitted, alone, sums, counts):
    mask = weights[1:] > 0
    assert count == mask.sum() > 0
    assert total == pytest.approx(plain[mask].sum(), abs=1e-5 * count)


def _write_jsonl(path, conversations):
  path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations))
  return str(path)


def test_evaluate_writes_predictions_and_scores(tmp_path, loaded, monkeypatch, capsys):
  monkeypatch.setattr(inference, "load", lambda workdir, config=None, quant=None: loaded)
  last_not_the_reply = [{"role": "assistant", "content": "four"}, {"role": "user", "content": "x"}]
  records = [*CONVERSATIONS[:3], CONVERSATIONS[4], last_not_the_reply]
  data = _write_jsonl(tmp_path / "val.jsonl", records)
  options = evaluation.Options(data=data, records=0, batch=8, template="plain", max_new=6)
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "keep.txt").write_text("mine")
  out = evaluation.run(str(tmp_path / "run"), options)
  eval_dir = tmp_path / "run" / "eval"
  rows = [json.loads(l) for l in (eval_dir / "predictions.jsonl").read_text().splitlines()]
  assert [r["reference"] for r in rows] == [m[-1]["content"] for m in records[:-1]]
  assert all(r["finish"] in ("length", "stop_token", "stop_sequence") for r in rows)
  assert rows[0]["prompt"] == "one two\n\n"
  saved = json.loads((eval_dir / "scores.json").read_text())
  assert saved == json.loads(json.dumps(out))
  for key in ("loss", "loss_stderr", "perplexity", "bits_per_byte", "examples", "tokens"):
    assert key in saved
  for key in ("truncated", "bleu", "chrf", "rouge1", "rouge2", "rougeL", "generated"):
    assert key in saved
  assert saved["generated"] == 4 and saved["skipped"] == 1 and saved["truncated"] == 0
  assert saved["checkpoint"] == "random init" and saved["template"] == "plain"
  assert saved["sampling"]["temperature"] == 0 and saved["sampling"]["max_new_tokens"] == 6
  assert sorted(os.listdir(tmp_path / "run")) == ["eval", "keep.txt"]
  assert sorted(os.listdir(eval_dir)) == ["predictions.jsonl", "scores.json"]
  assert "loss" in capsys.readouterr().out
  (tmp_path / "text.txt").write_text("one two three four five six seven eight.\n" * 4)
  evaluation.run(str(tmp_path / "run"), evaluation.Options(data=str(tmp_path / "text.txt")))
  assert sorted(os.listdir(eval_dir)) == ["scores.json"]  # no replies left from the task eval


def test_the_data_to_evaluate_defaults_to_a_task_runs_validation_file(tmp_path):
  config = tiny_config()
  with pytest.raises(UserError, match="--eval_data"):
    evaluation.data_path(None, config)  # a text run
  config.data.source = "task"
  with pytest.raises(UserError, match="has no data.val_path"):
    evaluation.data_path(None, config)
  config.data.val_path = "val.jsonl"
  assert evaluation.data_path(None, config)[:2] == ("val.jsonl", "task")
  assert evaluation.data_path("x/*.txt", config)[:2] == ("x/*.txt", "text")
  assert evaluation.data_path("x.json", config)[:2] == ("x.json", "task")


@pytest.mark.slow
def test_cli_evaluates_a_trained_run(trained_tiny, tmp_path):
  proc = run_cli(
    "--mode=evaluate",
    f"--workdir={trained_tiny}",
    f"--eval_data={DIALOGUE}",
    "--eval_records=4",
    "--eval_template=plain",
    f"--eval_dir={tmp_path}/eval",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "perplexity" in proc.stdout and "BLEU" in proc.stdout, proc.stdout
  scores = json.loads((tmp_path / "eval" / "scores.json").read_text())
  assert scores["generated"] == 4 and scores["examples"] == 424
  assert len((tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()) == 4


@pytest.mark.slow
def test_cli_errors_are_one_line(trained_tiny, tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"\n')
  args = ("--mode=evaluate", f"--workdir={trained_tiny}", f"--eval_dir={tmp_path}/eval")
  one_line_error(run_cli(*args, f"--eval_data={bad}"), f"{bad}:2")
  one_line_error(run_cli(*args), "--eval_data")
  assert not os.path.exists(tmp_path / "eval")

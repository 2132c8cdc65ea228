"""Evaluation scores: the text metrics' fixed points and orderings, and the loss summary's
standard error against a direct computation."""

import math

import numpy as np
import pytest

from gptjax import scores
from gptjax.errors import UserError

REFERENCES = [
  "JULIET: O Romeo, Romeo! wherefore art thou Romeo?",
  "ROMEO: Shall I hear more, or shall I speak at this?",
  "JULIET: What's in a name? that which we call a rose",
]


def test_perfect_replies_score_full_marks():
  got = scores.text_scores(REFERENCES, REFERENCES)
  assert got["bleu"] == pytest.approx(100.0) and got["chrf"] == pytest.approx(100.0)
  assert all(got[name] == pytest.approx(100.0) for name in scores.ROUGE) and got["n"] == 3


def test_closer_replies_score_higher():
  near = [r.replace("Romeo", "Tybalt", 1) for r in REFERENCES]
  far = ["KING HENRY: Once more unto the breach, dear friends."] * 3
  near_scores, far_scores = (
    scores.text_scores(near, REFERENCES),
    scores.text_scores(far, REFERENCES),
  )
  for name in ("bleu", "chrf", *scores.ROUGE):
    assert 100.0 > near_scores[name] > far_scores[name] >= 0.0, name


def test_rouge_is_the_mean_f1_of_each_reply():
  got = scores.text_scores(["a rose by any name", "wherefore"], ["a rose", "wherefore art thou"])
  # rouge1 F1: 2PR/(P+R) with P=2/5, R=2/2 -> 4/7; and P=1/1, R=1/3 -> 1/2
  assert got["rouge1"] == pytest.approx(100 * (4 / 7 + 1 / 2) / 2)


def test_rouge_reads_every_script_and_english_as_rouge_score_does():
  russian = ["Привет, как дела?", "Я иду домой"]
  got = scores.text_scores(russian, russian)
  assert all(got[name] == pytest.approx(100.0) for name in scores.ROUGE)  # was 0: no a-z
  assert scores.text_scores(["Я иду"], ["Я иду домой"])["rouge1"] == pytest.approx(100 * 0.8)
  from rouge_score import rouge_scorer

  default = rouge_scorer.RougeScorer(list(scores.ROUGE), use_stemmer=True)
  near = [r.replace("Romeo", "Tybalt", 1) for r in REFERENCES]
  for pred, ref in zip(near, REFERENCES):  # on English text, the library's own numbers
    ours = scores.text_scores([pred], [ref])
    want = default.score(ref, pred)
    assert all(ours[n] == pytest.approx(100 * want[n].fmeasure) for n in scores.ROUGE)


def test_the_loss_summary_and_its_standard_error():
  sums, counts = np.array([12.0, 30.0, 9.0, 21.0]), np.array([6, 10, 3, 7])
  got = scores.loss_summary(sums, counts, byte_counts=[6, 10, 3, 7])
  mean = sums.sum() / counts.sum()
  residuals = sums - mean * counts
  want_se = math.sqrt((residuals**2).sum() / (4 * 3)) / counts.mean()
  assert got["loss"] == pytest.approx(72 / 26) and got["loss_stderr"] == pytest.approx(want_se)
  assert got["perplexity"] == pytest.approx(math.exp(72 / 26))
  assert got["bits_per_byte"] == pytest.approx(72 / 26 / math.log(2))
  same = scores.loss_summary([2.0, 4.0], [1, 2])  # every example at 2 nats a token
  assert same["loss"] == pytest.approx(2.0) and same["loss_stderr"] == pytest.approx(0.0)


def test_bad_inputs_are_named():
  with pytest.raises(UserError, match="one prediction per reference"):
    scores.text_scores(["a"], ["a", "b"])
  with pytest.raises(UserError, match="at least two examples"):
    scores.loss_summary([1.0], [1])
  with pytest.raises(UserError, match="positive token count"):
    scores.loss_summary([1.0, 2.0], [1, 0])

"""Evaluation scores: how good generated replies are (BLEU and chrF with sacrebleu, ROUGE-1/2/L
with rouge-score, the standard implementations papers report), and a loss over held-out
examples with its standard error (so two runs' losses can be told apart, or not).

Text scores are on a 0-100 scale, as sacrebleu prints them; ROUGE is each reply's F1,
averaged, times 100.
"""

import math
import re

import numpy as np

from gptjax.errors import UserError

ROUGE = ("rouge1", "rouge2", "rougeL")


def text_scores(predictions: list[str], references: list[str]) -> dict:
  """Corpus BLEU and chrF, and mean ROUGE-1/2/L F1, of predictions against references."""
  if len(predictions) != len(references) or not predictions:
    raise UserError(
      f"scoring needs one prediction per reference ({len(predictions)} predictions, "
      f"{len(references)} references, at least one)"
    )
  # Imported here: rouge-score pulls in nltk and scipy (~0.7 s), which every CLI start would
  # otherwise pay, since main imports evaluation.
  import sacrebleu
  from rouge_score import rouge_scorer

  scorer = rouge_scorer.RougeScorer(list(ROUGE), tokenizer=_Words())
  rouge = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
  return {
    "bleu": sacrebleu.corpus_bleu(predictions, [references]).score,
    "chrf": sacrebleu.corpus_chrf(predictions, [references]).score,
    **{name: 100 * float(np.mean([r[name].fmeasure for r in rouge])) for name in ROUGE},
    "n": len(predictions),
  }


class _Words:
  """rouge-score's default tokenizer (lower case, Porter stems of words over 3 characters),
  identical on ASCII text, but keeping other scripts' letters and digits: the default drops
  everything outside [a-z0-9], which scores Cyrillic, Greek or Chinese replies 0."""

  def __init__(self):
    from nltk.stem import porter

    self.stemmer = porter.PorterStemmer()

  def tokenize(self, text: str) -> list[str]:
    words = re.findall(r"[^\W_]+", text.lower())
    return [self.stemmer.stem(w) if len(w) > 3 and w.isascii() else w for w in words]


def loss_summary(loss_sums, token_counts, byte_counts=None) -> dict:
  """Mean loss per token over examples (each the sum of its tokens' losses, nats, and its
  token count), with the standard error of that ratio across examples; perplexity, and bits
  per byte when byte counts are given.

  The standard error treats examples as the independent draws (tokens within one are not):
  the delta method for a ratio of sums, sqrt(sum_i (L_i - mean n_i)^2 / (k (k - 1))) / mean(n).
  """
  sums = np.asarray(loss_sums, np.float64)
  counts = np.asarray(token_counts, np.float64)
  if sums.shape != counts.shape or sums.ndim != 1 or len(sums) < 2 or (counts <= 0).any():
    raise UserError(
      "a loss summary needs at least two examples, each with a loss sum and a positive token count"
    )
  k, mean = len(sums), sums.sum() / counts.sum()
  stderr = math.sqrt(((sums - mean * counts) ** 2).sum() / (k * (k - 1))) / counts.mean()
  out = {"loss": mean, "loss_stderr": stderr, "perplexity": math.exp(mean), "examples": k}
  if byte_counts is not None:
    out["bits_per_byte"] = sums.sum() / math.log(2) / float(np.sum(byte_counts))
  return out

"""--mode=evaluate: a trained or fine-tuned model's loss on held-out data, and its replies.

Loss, with its standard error (scores.loss_summary), on either kind of data:
  task  JSONL conversations (--eval_data=*.jsonl, else the run's data.val_path): each is
        encoded with the run's chat template and scored on its assistant tokens only; the
        examples are packed into rows (segments keep them apart), one jitted forward per
        batch of rows. The error is over examples.
  text  any other file or glob: the standard strided perplexity. Windows of block_size
        tokens every `stride` tokens, each scoring only the tokens the previous one did not,
        so every token after the first is scored once with as much context as the stride
        leaves. The error is over windows.
On task data the first --eval_records replies are also generated (greedy unless a
temperature is given), each as if alone (offline.complete: the batch size changes the speed,
not the replies, but for float rounding), and scored against the references with BLEU, chrF
and ROUGE.
EVAL_DIR gets scores.json and predictions.jsonl, each written whole (tmp + rename).
"""

import dataclasses
import json

import jax
import numpy as np

from gptjax import (
  chat_template,
  data,
  decode,
  engine,
  inference,
  offline,
  packing,
  quantize,
  scores,
  storage,
  task_data,
)
from gptjax.errors import UserError
from gptjax.loss import cross_entropy
from gptjax.storage import ensure_writable_dir
from gptjax.tokenizer import EOT, UnknownCharacter


@dataclasses.dataclass(frozen=True)
class Options:
  data: str | None = None  # None: the run's own validation data (task runs)
  eval_dir: str | None = None  # None: WORKDIR/eval
  stride: int | None = None  # text: None is block_size // 2
  records: int = 100  # replies to generate (0: all)
  batch: int = 16  # rows per forward, replies generated at once (engine slots)
  generate: bool = True
  max_new: int | None = None  # None: twice the longest reference, at most the context
  sampling: decode.Sampling = decode.Sampling(temperature=0.0)
  seed: int = 0
  template: str | None = None  # None: the run's data.chat_template
  quant: quantize.Quant = quantize.Quant()  # int8 weights / KV cache

  def check(self) -> None:
    for name, value, least in (
      ("--eval_records", self.records, 0),
      ("--eval_batch", self.batch, 1),
      ("--eval_stride", self.stride, 1),
      ("--max_new_tokens", self.max_new, 1),
    ):
      if value is not None and value < least:
        raise UserError(f"{name}={value} must be at least {least}")


def run(workdir: str, options: Options, config=None) -> dict:
  """Evaluates the run in `workdir` (or config.init_from's model); returns scores.json's dict."""
  options.check()
  loaded = inference.load(workdir, config, quant=options.quant)
  options.sampling.check(loaded.model.cfg.vocab_size)
  path, kind, flag = data_path(options.data, loaded.config)
  if kind == "text" and options.template:
    raise UserError(
      f"--eval_template applies to conversations (.jsonl), and --eval_data={path} is text; "
      "drop --eval_template"
    )
  out = {"checkpoint": loaded.where, "data": storage.absolute(path), "kind": kind}
  predictions = None
  if kind == "text":
    stride = options.stride or max(1, loaded.model.cfg.block_size // 2)
    out.update(text_loss(loaded, path, stride, options.batch), stride=stride)
  else:
    d = loaded.config.data
    template = chat_template.load(options.template or d.chat_template)
    conversations = task_data.read(path, d.prompt_field, d.completion_field, flag)
    out.update(task_loss(loaded, template, conversations, path, options.batch))
    out["template"] = template.name
    if options.generate:
      predictions, generated = generate(loaded, template, conversations, options)
      out.update(generated)
  eval_dir = options.eval_dir or storage.join(workdir, "eval")
  ensure_writable_dir(eval_dir, "--eval_dir")
  if predictions is not None:
    lines = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions)
    _write(storage.join(eval_dir, "predictions.jsonl"), lines)
  elif storage.exists(storage.join(eval_dir, "predictions.jsonl")):  # an older evaluation's:
    storage.remove(storage.join(eval_dir, "predictions.jsonl"))  # it pairs with the scores replaced
  _write(storage.join(eval_dir, "scores.json"), json.dumps(out, indent=2) + "\n")
  print(summary(out, eval_dir), flush=True)
  return out


def data_path(given: str | None, config) -> tuple[str, str, str]:
  """(path, "task" | "text", the setting that named it): a .jsonl (or .json) path or glob is
  task data, anything else text."""
  if given:
    return given, "task" if given.endswith((".jsonl", ".json")) else "text", "--eval_data"
  if config.data.source == "task" and config.data.val_path:
    return config.data.val_path, "task", "the run's config.data.val_path (pass --eval_data)"
  which = "has no data.val_path" if config.data.source == "task" else "is not a task run"
  raise UserError(
    f"the run {which}, so there is no held-out data to default to; pass "
    "--eval_data=FILE.jsonl (conversations) or --eval_data=FILE_OR_GLOB (text)"
  )


def _write(path: str, text: str) -> None:
  """Replaces path whole, so a reader never sees half a file."""
  storage.write_text(path, text)


def token_losses(loaded: inference.Loaded, batch: int):
  """f(tokens (R, T+1), positions, segments) -> (R, T) nats of each target, float64 on the
  host; rows go through one jitted forward `batch` at a time (the last batch padded with
  empty rows), so it compiles once per kind of input."""
  model = loaded.model

  @jax.jit
  def forward(params, tokens_BxT1, positions_BxT, segments_BxT):
    logits_BxTxV = model.apply(
      {"params": params}, tokens_BxT1[:, :-1], positions_BxT, segments_BxT=segments_BxT
    )
    return cross_entropy(logits_BxTxV, tokens_BxT1[:, 1:], model.cfg.vocab_size)

  def run_rows(tokens, positions=None, segments=None) -> np.ndarray:
    out = []
    for i in range(0, len(tokens), batch):
      parts = [
        a if a is None else _pad_rows(a[i : i + batch], batch)
        for a in (tokens, positions, segments)
      ]
      out.append(np.asarray(forward(loaded.params, *parts), np.float64))
    n = len(tokens)
    return np.concatenate(out)[:n] if out else np.zeros((0, tokens.shape[1] - 1))

  return run_rows


def _pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
  return np.concatenate([a, np.zeros((rows - len(a), *a.shape[1:]), a.dtype)])


def windows(n_tokens: int, block: int, stride: int) -> list[tuple[int, int, int]]:
  """(start, first, end) of each strided window over n_tokens: its inputs are tokens
  start..start+block-1, and it scores its targets first..end-1 (target t predicts token
  start+t+1), the ones no earlier window scored."""
  out, scored, start = [], 0, 0  # tokens 1..scored have been scored
  while scored < n_tokens - 1:
    end = min(start + block, n_tokens - 1)
    out.append((start, scored - start, end - start))
    scored, start = end, start + stride
  return out


def text_loss(loaded: inference.Loaded, path: str, stride: int, batch: int) -> dict:
  """The strided loss of a text file or glob (its files joined, as training reads them)."""
  block, tok = loaded.model.cfg.block_size, loaded.tokenizer
  if stride > block:
    raise UserError(f"--eval_stride={stride} would skip tokens; use 1..{block} (block_size)")
  text = "".join(data.read_text_files(path, "--eval_data"))
  try:
    ids = tok.encode(text).astype(np.int32)
  except UserError as e:  # a character the vocabulary lacks
    raise UserError(f"--eval_data={path}: {e}") from None
  spans = windows(len(ids), block, stride)
  if len(spans) < 2:
    raise UserError(
      f"--eval_data={path} holds {len(ids)} tokens, one window of the {block}-token "
      f"context; a standard error needs more, pass over {block + 1} tokens of text"
    )
  forward, sums, counts = token_losses(loaded, batch), [], []
  for i in range(0, len(spans), 4096):  # a few thousand windows in memory at a time
    chunk = spans[i : i + 4096]
    tokens = np.zeros((len(chunk), block + 1), np.int32)
    weights = np.zeros((len(chunk), block), bool)
    for r, (start, first, end) in enumerate(chunk):
      piece = ids[start : start + block + 1]
      tokens[r, : len(piece)] = piece
      weights[r, first:end] = True
    losses = forward(tokens)
    sums += np.where(weights, losses, 0.0).sum(axis=1).tolist()
    counts += weights.sum(axis=1).tolist()
  unscored = len(tok.decode(ids[:1]).replace(EOT, "").encode("utf-8"))
  out = scores.loss_summary(sums, counts, [len(text.encode("utf-8")) - unscored])
  out["windows"] = out.pop("examples")
  return {**out, "tokens": int(sum(counts))}


def encode_all(template, conversations, tok, path: str):
  """(ids, weights) of each conversation, weight 1 on the assistant's tokens."""
  where = getattr(conversations, "where", None) or [
    f"{path}: record {i + 1}" for i in range(len(conversations))
  ]
  out = []
  for messages, at in zip(conversations, where):
    try:
      out.append(template.encode(messages, tok))
    except UnknownCharacter as e:  # the model's vocabulary is fixed: only the data can change
      raise UserError(f"{at}: {e.problem}; the model cannot read it: remove it") from None
    except UserError as e:
      raise UserError(f"{at}: {e}") from None
  return out


def pack_rows(examples, block: int):
  """Packed rows of whole examples (one longer than a row keeps its end) and, per (row,
  target), the index of its example (-1: not scored). No example that fits is cut
  (cut_to_fill=False), so each one's loss is as if alone."""
  packed = packing.pack(examples, block, cut_to_fill=False)
  if not packed.members:
    raise UserError("no example has a token to score; check the data and the chat template")
  example_of = np.full(packed.segments.shape, -1, np.int64)
  for r, row in enumerate(packed.members):
    owner = np.asarray([-1] + row)[packed.segments[r]]
    example_of[r] = np.where(packed.weights[r] > 0, owner, -1)
  return packed.tokens, packed.positions, packed.segments, example_of


def example_losses(loaded: inference.Loaded, examples, batch: int):
  """(summed nats, scored tokens) of each (ids, weights) example, packed."""
  tokens, positions, segments, example_of = pack_rows(examples, loaded.model.cfg.block_size)
  losses = token_losses(loaded, batch)(tokens, positions, segments)
  sums, counts = np.zeros(len(examples)), np.zeros(len(examples))
  mask = example_of >= 0
  np.add.at(sums, example_of[mask], losses[mask])
  np.add.at(counts, example_of[mask], 1.0)
  return sums, counts


def task_loss(loaded: inference.Loaded, template, conversations, path: str, batch: int) -> dict:
  """Loss on the assistant tokens, per example; counts truncated and unscored examples."""
  block, tok = loaded.model.cfg.block_size, loaded.tokenizer
  examples = encode_all(template, conversations, tok, path)
  sums, counts = example_losses(loaded, examples, batch)
  scored = np.flatnonzero(counts)
  if len(scored) < 2:
    raise UserError(
      f"--eval_data={path} has {len(scored)} example(s) with assistant tokens to score; a "
      "standard error needs at least two"
    )
  byte_counts = [_scored_bytes(tok, examples[e], block) for e in scored]
  out = scores.loss_summary(sums[scored], counts[scored], byte_counts)
  return {
    **out,
    "tokens": int(counts.sum()),
    "truncated": sum(len(ids) > block + 1 for ids, _ in examples),
    "unscored": int(len(examples) - len(scored)),
  }


def _scored_bytes(tok, example, block: int) -> int:
  """UTF-8 bytes of an example's scored tokens (end-of-text counts none, as in training)."""
  ids, weights = packing.cut(*(np.asarray(a) for a in example), block + 1)
  scored = ids[1:][weights[1:] > 0]
  return len(tok.decode(scored).replace(EOT, "").encode("utf-8"))


def generate(loaded: inference.Loaded, template, conversations, options: Options):
  """Replies to the first options.records conversations (0: all) that end with an
  assistant turn: (prediction rows, their scores with counts and settings)."""
  tok, block = loaded.tokenizer, loaded.model.cfg.block_size
  records = conversations[: options.records or None]
  usable = [m for m in records if m[-1]["role"] == "assistant"]
  skipped = len(records) - len(usable)
  if not usable:
    raise UserError(
      "no record to generate for ends with an assistant turn (the reference); pass "
      "--eval_generate=0 to score the loss alone"
    )
  prompts = [template.prompt(m[:-1], tok).tolist() or [tok.eot_id] for m in usable]
  references = [m[-1]["content"] for m in usable]
  longest = max(len(chat_template.encode_text(tok, r)) for r in references)
  max_new = options.max_new or min(block, max(1, 2 * longest))
  end = template.end_of_turn
  # Each reply is generated as if alone (offline.complete): the same whatever --eval_batch.
  slots = min(options.batch, len(prompts))  # a cache row each: no more than there are replies
  eng = engine.Engine(loaded.model, loaded.params, slots, stop_tokens=[tok.eot_id])
  stops = (end,) if end != EOT else ()
  texts, reasons = offline.complete(
    eng, tok, prompts, max_new, options.sampling, options.seed, stops
  )
  predictions = [t.strip() for t in texts]
  rows = [
    {
      "prompt": template.render(m[:-1], add_generation_prompt=True),
      "reference": reference,
      "prediction": text,
      "finish": reason,
    }
    for m, reference, text, reason in zip(usable, references, predictions, reasons)
  ]
  settings = dataclasses.asdict(options.sampling)
  settings.update(seed=options.seed, max_new_tokens=max_new)
  out = scores.text_scores(predictions, references)
  return rows, {**out, "generated": out.pop("n"), "skipped": skipped, "sampling": settings}


def summary(out: dict, eval_dir: str) -> str:
  """A few lines for stdout."""
  where = f"{out['kind']}, template {out['template']}" if "template" in out else out["kind"]
  count = f"{out['windows']} windows" if "windows" in out else f"{out['examples']} examples"
  lines = [f"evaluated {out['checkpoint']} on {out['data']} ({where})"]
  line = f"{count}, {out['tokens']} tokens scored"
  if out.get("truncated"):
    line += (
      f"; {out['truncated']} examples longer than the context were cut (oldest context "
      "first; a reply longer than the context keeps its start)"
    )
  if out.get("unscored"):
    line += f"; {out['unscored']} had no token to score"
  lines.append(line)
  lines.append(
    f"loss {out['loss']:.4f} ± {out['loss_stderr']:.4f} | perplexity {out['perplexity']:.2f}"
    f" | bits/byte {out['bits_per_byte']:.4f}"
  )
  if "bleu" in out:
    s = out["sampling"]
    how = "greedy" if s["temperature"] == 0 else f"temperature {s['temperature']}"
    skipped = f", {out['skipped']} skipped (last turn not the assistant's)" * bool(out["skipped"])
    lines.append(
      f"{out['generated']} replies ({how}, up to {s['max_new_tokens']} tokens{skipped}): "
      f"BLEU {out['bleu']:.2f} | chrF {out['chrf']:.2f} | ROUGE-1/2/L {out['rouge1']:.1f}/"
      f"{out['rouge2']:.1f}/{out['rougeL']:.1f}"
    )
  lines.append(f"wrote {eval_dir}/scores.json" + " and predictions.jsonl" * ("bleu" in out))
  return "\n".join(lines)

"""Entry point: `python -m gptjax.main --config=experiments/NAME.py[:ARG] --workdir=DIR`.

Parses flags and hands over to a library function; every UserError (here or in flag parsing)
becomes one line on stderr and exit code 1 (gptjax/cli.py).
"""

from absl import flags
from ml_collections import config_flags

from gptjax import chat, cli, decode, evaluation, export, inference, loop, quantize
from gptjax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Experiment file, e.g. experiments/shakespeare_char.py:cpu; override any "
  "key with --config.a.b=value.",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where metrics, events, config and data go.")
_MODE = flags.DEFINE_enum(
  "mode",
  "train",
  ["train", "compile_only", "export", "sample", "chat", "evaluate"],
  "train: train and evaluate (resuming from the workdir's newest checkpoint). compile_only: "
  "compile the step for the configured mesh, print per-device memory and exit (non-zero when "
  "it will not fit). export: write the newest checkpoint's params (no optimizer state) with "
  "config and tokenizer to WORKDIR/export (or --export_dir); needs no --config. sample: "
  "print continuations of --prompt from the newest checkpoint (or export) in WORKDIR. "
  "chat: an interactive conversation on stdin with that model, replies streamed. evaluate: "
  "that model's loss on held-out data (--eval_data, else a task run's data.val_path) and, on "
  "task data, its replies scored with BLEU/chrF/ROUGE, written to --eval_dir.",
)
_EXPORT_DIR = flags.DEFINE_string(
  "export_dir",
  None,
  "--mode=export: where to write (default WORKDIR/export, or WORKDIR/export_hf).",
)
_EXPORT_FORMAT = flags.DEFINE_enum(
  "export_format",
  "gptjax",
  ["gptjax", "hf"],
  "--mode=export: gptjax (params, config, "
  "tokenizer) or hf (a GPT2LMHeadModel directory: config.json + model.safetensors).",
)
_QUANTIZE = flags.DEFINE_string(
  "quantize",
  "none",
  "sample, chat, evaluate: int8 runs the model with int8 weights (one scale per output "
  "channel, made as it loads); export: writes them (an int8 export loads directly).",
)
_KV_QUANT = flags.DEFINE_string(
  "kv_quant", "none", "sample, chat, evaluate: int8 keeps the KV cache in int8."
)
_PROMPT = flags.DEFINE_string(
  "prompt", "", "--mode=sample: the text to continue ('' starts from the end-of-text token)."
)
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Samples to draw (one batch).")
_MAX_NEW = flags.DEFINE_integer(
  "max_new_tokens",
  500,
  "Tokens to generate per sample (chat: per reply, default half the context; evaluate: per "
  "reply, default twice the longest reference's tokens, at most the context).",
)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Keep the smallest set of tokens with this mass.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_STREAM_TOKENS = flags.DEFINE_integer(
  "stream_tokens", 8, "--mode=chat: tokens per jitted call, printed after each call."
)
_USER = flags.DEFINE_string(
  "user_name",
  "User",
  "--mode=chat: the user's speaker name, shown and given to the chat template (the play "
  "template writes it; templates without speaker names ignore it).",
)
_ASSISTANT = flags.DEFINE_string(
  "assistant_name",
  "Assistant",
  "--mode=chat: the model's speaker name (e.g. ROMEO and JULIET for Shakespeare), shown and "
  "given to the chat template (the play template writes it; others may ignore it).",
)

_EVAL_DATA = flags.DEFINE_string(
  "eval_data",
  None,
  "--mode=evaluate: held-out data: a .jsonl file or glob of conversations (scored on the "
  "assistant's tokens), or any other file or glob of text (strided loss). Default: a task "
  "run's data.val_path.",
)
_EVAL_DIR = flags.DEFINE_string(
  "eval_dir", None, "--mode=evaluate: where scores.json and predictions.jsonl go (WORKDIR/eval)."
)
_EVAL_STRIDE = flags.DEFINE_integer(
  "eval_stride",
  None,
  "--mode=evaluate on text: tokens between windows; each scores only the tokens the previous "
  "did not (default half the context; the context itself: non-overlapping windows).",
)
_EVAL_RECORDS = flags.DEFINE_integer(
  "eval_records", 100, "--mode=evaluate: records to generate replies for, from the first (0: all)."
)
_EVAL_BATCH = flags.DEFINE_integer(
  "eval_batch", 16, "--mode=evaluate: rows per forward pass, and replies generated at once."
)
_EVAL_GENERATE = flags.DEFINE_bool(
  "eval_generate",
  True,
  "--mode=evaluate on task data: generate replies and score them (greedy unless --temperature "
  "is given); --eval_generate=0 scores the loss alone.",
)
_EVAL_TEMPLATE = flags.DEFINE_string(
  "eval_template",
  None,
  "--mode=evaluate: the chat template for task data (a built-in name or a Jinja2 file; "
  "default the run's data.chat_template).",
)


# The others read WORKDIR/config.json; sample, chat and evaluate take a --config with
# init_from.
_NEEDS_CONFIG = ("train", "compile_only")
_DECODING = ("sample", "chat", "evaluate")
# The modes that read each mode-specific flag: given to another mode it would do nothing.
_READ_BY = {
  **dict.fromkeys(("export_dir", "export_format"), ("export",)),
  **dict.fromkeys(("prompt", "num_samples"), ("sample",)),
  **dict.fromkeys(("max_new_tokens", "temperature", "top_k", "top_p", "seed"), _DECODING),
  **dict.fromkeys(("stream_tokens", "user_name", "assistant_name"), ("chat",)),
  **dict.fromkeys(
    (
      "eval_data",
      "eval_dir",
      "eval_stride",
      "eval_records",
      "eval_batch",
      "eval_generate",
      "eval_template",
    ),
    ("evaluate",),
  ),  # fmt: skip
}


def check_flags() -> None:
  """Which flags go together (after parsing; cli turns a UserError into one line)."""
  if _MODE.value in _NEEDS_CONFIG and _CONFIG.value is None:
    raise UserError(
      f"--mode={_MODE.value} needs --config, e.g. --config=experiments/shakespeare_char.py:cpu"
    )
  if not _WORKDIR.value:
    raise UserError("--workdir is required, e.g. --workdir=/tmp/run")
  quantize.Quant(_QUANTIZE.value, _KV_QUANT.value).check()
  mode, hf_export = _MODE.value, _EXPORT_FORMAT.value == "hf"
  for name, modes in _READ_BY.items():
    if flags.FLAGS[name].present and mode not in modes:
      raise UserError(f"--{name} is read by --mode={'|'.join(modes)}, not --mode={mode}; drop it")
  if mode == "export" and _CONFIG.value is not None:
    raise UserError(
      "--mode=export exports a run as it was trained (WORKDIR/config.json); drop --config"
    )
  if _KV_QUANT.value != "none" and mode not in ("sample", "chat", "evaluate"):
    raise UserError(f"--kv_quant is for sample, chat and evaluate, not --mode={mode}")
  if _QUANTIZE.value != "none" and (mode in _NEEDS_CONFIG or hf_export):
    raise UserError(
      f"--quantize is for inference (sample, chat, evaluate, or a gptjax export), not "
      f"--mode={mode}{' --export_format=hf' if hf_export else ''}"
    )


def main(argv) -> None:
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}; flags look like --name=value")
  mode, workdir, config = _MODE.value, _WORKDIR.value, _CONFIG.value
  sampling = decode.Sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
  quant = quantize.Quant(_QUANTIZE.value, _KV_QUANT.value)
  if mode == "train":
    loop.train_and_evaluate(config, workdir)
  elif mode == "compile_only":
    loop.compile_only(config, workdir)
  elif mode == "export" and _EXPORT_FORMAT.value == "hf":
    export.export_hf(workdir, _EXPORT_DIR.value)
  elif mode == "export":
    export.export(workdir, _EXPORT_DIR.value, weights=quant.weights)
  elif mode == "sample":
    inference.sample_text(
      workdir,
      _PROMPT.value,
      _NUM_SAMPLES.value,
      _MAX_NEW.value,
      sampling,
      _SEED.value,
      config,
      quant,
    )
  elif mode == "chat":
    max_new = _MAX_NEW.value if flags.FLAGS["max_new_tokens"].present else None
    options = chat.Options(
      max_new,
      sampling,
      _SEED.value,
      _STREAM_TOKENS.value,
      _USER.value,
      _ASSISTANT.value,
      quant=quant,
    )
    chat.run(workdir, options, config)
  elif mode == "evaluate":
    evaluation.run(workdir, evaluate_options(sampling, quant), config)


def evaluate_options(sampling: decode.Sampling, quant: quantize.Quant) -> evaluation.Options:
  """--mode=evaluate's flags; greedy and the reference-sized budget unless given."""
  given = lambda name: flags.FLAGS[name].present
  if not given("temperature"):  # sampling's default 0.8 is for sample and chat
    sampling = decode.Sampling(0.0, sampling.top_k, sampling.top_p)
  return evaluation.Options(
    data=_EVAL_DATA.value,
    eval_dir=_EVAL_DIR.value,
    stride=_EVAL_STRIDE.value,
    records=_EVAL_RECORDS.value,
    batch=_EVAL_BATCH.value,
    generate=_EVAL_GENERATE.value,
    max_new=_MAX_NEW.value if given("max_new_tokens") else None,
    sampling=sampling,
    seed=_SEED.value,
    template=_EVAL_TEMPLATE.value,
    quant=quant,
  )


if __name__ == "__main__":
  cli.run(main, "gptjax", check_flags)

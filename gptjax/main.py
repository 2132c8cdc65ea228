"""Entry point: `python -m gptjax.main --config=experiments/NAME.py[:ARG] --workdir=DIR`.

Parses flags and hands over to a library function; every UserError (here or in flag parsing)
becomes one line on stderr and exit code 1.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from gptjax import workdir
from gptjax.errors import UserError, check_config_file, innermost_message

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
  ["train", "compile_only", "export", "sample", "chat"],
  "train: train and evaluate (resuming from the workdir's newest checkpoint). compile_only: "
  "compile the step for the configured mesh, print per-device memory and exit (non-zero when "
  "it will not fit). export: write the newest checkpoint's params (no optimizer state) with "
  "config and tokenizer to WORKDIR/export (or --export_dir); needs no --config. sample: "
  "print continuations of --prompt from the newest checkpoint (or export) in WORKDIR. "
  "chat: an interactive conversation on stdin with that model, replies streamed.",
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
_PROMPT = flags.DEFINE_string(
  "prompt", "", "--mode=sample: the text to continue ('' starts from the end-of-text token)."
)
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Samples to draw (one batch).")
_MAX_NEW = flags.DEFINE_integer(
  "max_new_tokens",
  500,
  "Tokens to generate per sample (chat: per reply, default half the context).",
)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Keep the smallest set of tokens with this mass.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_STREAM_TOKENS = flags.DEFINE_integer(
  "stream_tokens", 8, "--mode=chat: tokens per jitted call, printed after each call."
)
_USER = flags.DEFINE_string("user_name", "User", "--mode=chat: the user's speaker name.")
_ASSISTANT = flags.DEFINE_string(
  "assistant_name",
  "Assistant",
  "--mode=chat: the model's speaker name (e.g. ROMEO and JULIET for Shakespeare).",
)


# The others read WORKDIR/config.json; sample and chat take a --config with init_from.
_NEEDS_CONFIG = ("train", "compile_only")


def _fail(message: str) -> None:
  print(f"gptjax: error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
  sys.exit(1)


def _parse_flags(argv):
  """absl's parser, but each bad flag or config override is a one-line error."""
  try:
    check_config_file(argv)
    rest = flags.FLAGS(argv)
    if not flags.FLAGS["verbosity"].present:  # INFO chatter only with --verbosity=0
      logging.set_verbosity(logging.WARNING)
    if _MODE.value in _NEEDS_CONFIG and _CONFIG.value is None:
      raise UserError(
        f"--mode={_MODE.value} needs --config, e.g. --config=experiments/shakespeare_char.py:cpu"
      )
    if _CONFIG.value is not None:
      _CONFIG.value.keys()  # the experiment file loads lazily: make its errors surface here
    if not _WORKDIR.value:
      raise UserError("--workdir is required, e.g. --workdir=/tmp/run")
    workdir.normalize_flags(flags.FLAGS)
    return rest
  except (flags.Error, UserError) as e:
    _fail(e)
  except (AttributeError, KeyError) as e:  # ml_collections' word for an unknown key
    lines = innermost_message(e).splitlines()
    name = lines[0].strip("'\"")
    keys = [a.split("=")[0][len("--") :] for a in argv if a.startswith("--config.")]
    key = next((k for k in keys if name in k.split(".")), name)
    hint = f" ({lines[1]})" if len(lines) > 1 else ""
    _fail(f"unknown config key {key!r}{hint}; the keys and their defaults are in gptjax/config.py")
  except Exception as e:  # an experiment file that fails to load, or a bad variant name
    _fail(f"cannot load the experiment config: {type(e).__name__}: {e}")


def main(argv) -> None:
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}; flags look like --name=value")
  import jax  # after flag parsing: a typo fails before JAX starts

  from gptjax import train

  try:
    if _MODE.value == "train":
      train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    elif _MODE.value == "compile_only":
      train.compile_only(_CONFIG.value, _WORKDIR.value)
    elif _MODE.value == "export" and _EXPORT_FORMAT.value == "hf":
      from gptjax import hf

      hf.export(_WORKDIR.value, _EXPORT_DIR.value)
    elif _MODE.value == "export":
      from gptjax import checkpoint

      checkpoint.export(_WORKDIR.value, _EXPORT_DIR.value)
    elif _MODE.value == "sample":
      from gptjax import sample

      sample.sample(
        _WORKDIR.value,
        _PROMPT.value,
        _NUM_SAMPLES.value,
        _MAX_NEW.value,
        _TEMPERATURE.value,
        _TOP_K.value,
        _TOP_P.value,
        _SEED.value,
        _CONFIG.value,
      )
    elif _MODE.value == "chat":
      from gptjax import chat

      max_new = _MAX_NEW.value if flags.FLAGS["max_new_tokens"].present else None
      chat.run(
        _WORKDIR.value,
        max_new,
        _TEMPERATURE.value,
        _TOP_K.value,
        _TOP_P.value,
        _SEED.value,
        _STREAM_TOKENS.value,
        _USER.value,
        _ASSISTANT.value,
        _CONFIG.value,
      )
  except UserError as e:
    _fail(e)
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    _fail(
      f"out of device memory ({str(e).splitlines()[0][:160]}); raise "
      "--config.optim.grad_accum, shard over more devices (--config.mesh.shape.fsdp), or "
      "shorten --config.model.block_size"
    )
  except KeyboardInterrupt:
    _fail("interrupted")


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)

#!/usr/bin/env bash
# A new user's first hour: every README command, in the README's order, from a fresh clone
# of this repository, checked for its exit code and the files it should leave.
#
#   bash scripts/first_hour.sh [DIR]     # DIR (default: a new temporary folder) gets the clone
#   FIRST_HOUR_FULL=1 bash scripts/first_hour.sh   # also the full suite (CI's ~9 minutes)
#
# The commands are the README's own, verbatim, except:
# - step counts are shortened (`--config.train.num_steps=N`, `--steps`, `--new_tokens`, ...);
# - offline, TFDS gets `--config.data.manual_dir=../shared/data/tinyshakespeare` where the
#   README's command downloads (the README's "running offline" spelling);
# - placeholders become real things made here: `corpus/` (tiny Shakespeare), `/models/gpt2`
#   (a random GPT-2 of a small shape with its BPE tokenizer.json: no weights can be
#   downloaded) and `/tmp/X` workdirs (folders under DIR, so two runs never collide);
# - GPT-2 on lm1b cannot be trained offline: its training commands run as compile_only
#   (which reads no data), and fine-tuning from /models/gpt2 trains on local text.
# Needs `../shared/data` beside this repository (as CI has it) and the package registry.
set -uo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
SHARED="$(cd "$REPO/../shared" && pwd)" || {
  echo "first_hour: ../shared is missing beside $REPO" >&2
  exit 1
}
ROOT="${1:-$(mktemp -d /tmp/first-hour.XXXXXX)}"
mkdir -p "$ROOT" && ROOT="$(cd "$ROOT" && pwd)"
[ -e "$ROOT/gptjax" ] && {
  echo "first_hour: $ROOT/gptjax exists; give an empty DIR" >&2
  exit 1
}
ln -sfn "$SHARED" "$ROOT/shared"
git clone -q "$REPO" "$ROOT/gptjax" || exit 1
cd "$ROOT/gptjax" || exit 1
LOGS="$ROOT/logs" && mkdir -p "$LOGS"
SCRATCH="$ROOT/tmp" && mkdir -p "$SCRATCH"
# TFDS's cache and gptjax's compile cache start empty, as on a new machine; the user's stay
# untouched.
export TFDS_DATA_DIR="$ROOT/tensorflow_datasets"
export JAX_PLATFORMS=cpu
START=$(date +%s)
FAILED=0
N=0

# step NAME EXPECTED_EXIT COMMAND [FILE...]: runs COMMAND in bash, logs it, checks the exit
# code and that each FILE exists afterwards.
step() {
  local name="$1" want="$2" cmd="$3"
  shift 3
  N=$((N + 1))
  local log="$LOGS/$(printf %02d "$N")-$name.log" t0=$(date +%s)
  echo "\$ $cmd" >"$log"
  bash -c "$cmd" >>"$log" 2>&1 </dev/null
  local rc=$? took=$(($(date +%s) - t0)) bad=""
  [ "$rc" -eq "$want" ] || bad="exit code $rc, expected $want"
  for f in "$@"; do
    [ -e "$f" ] || bad="${bad:+$bad; }missing $f"
  done
  if [ -n "$bad" ]; then
    FAILED=$((FAILED + 1))
    printf 'FAIL %-28s %4ss  %s (log: %s)\n' "$name" "$took" "$bad" "$log"
    tail -5 "$log" | sed 's/^/     | /'
  else
    printf 'ok   %-28s %4ss\n' "$name" "$took"
  fi
  LAST_LOG="$log"
}

python3 -m venv .venv && . .venv/bin/activate && python -m pip install -q --upgrade pip

# --- Quickstart ------------------------------------------------------------------------
step install-tfds 0 'pip install -q -e ".[tfds]"'
# Offline, with nothing prepared: the Quickstart command must fail fast, in one line.
t0=$(date +%s)
step quickstart-offline 1 \
  'python -m gptjax.main --config=experiments/shakespeare_char.py --workdir=runs/shakespeare_char'
took=$(($(date +%s) - t0))
errors=$(($(grep -vc '^\$ \|^preparing TFDS dataset' "$LAST_LOG") + 0))
if [ "$took" -ge 30 ] || [ "$errors" -ne 1 ] || ! grep -q "^gptjax: error: cannot download or prepare TFDS dataset 'tiny_shakespeare'" "$LAST_LOG"; then
  FAILED=$((FAILED + 1)) && echo "FAIL quickstart-offline: ${took}s, not one line in under 30 s"
fi
step quickstart 0 \
  'python -m gptjax.main --config=experiments/shakespeare_char.py --workdir=runs/shakespeare_char --config.data.manual_dir=../shared/data/tinyshakespeare --config.train.num_steps=3 --config.train.eval_batches=2' \
  runs/shakespeare_char/summary.json runs/shakespeare_char/checkpoints/3

# --- Tests (CI runs the full suite) ----------------------------------------------------
step install-test 0 'pip install -q -e ".[test]"'
if [ "${FIRST_HOUR_FULL:-0}" = 1 ]; then
  step tests-full 0 'python -m pytest -q -n 2 tests'
fi
step tests-fast 0 'python -m pytest -q -m "not slow" tests'

# --- Experiments and overrides ---------------------------------------------------------
step overrides 0 \
  'python -m gptjax.main --config=experiments/shakespeare_char.py:cpu --workdir=runs/variants --config.data.manual_dir=../shared/data/tinyshakespeare --config.model.norm=rmsnorm --config.model.positions=rope --config.model.activation=swiglu --config.train.num_steps=50' \
  runs/variants/summary.json
step overrides-typo 1 \
  'python -m gptjax.main --config=experiments/shakespeare_char.py:cpu --workdir=runs/typo --config.model.nrom=rmsnorm'

# --- Data, and running offline ---------------------------------------------------------
step offline-tfds 0 \
  "python -m gptjax.main --config=experiments/shakespeare_char.py:cpu --workdir=$SCRATCH/sc --config.data.manual_dir=../shared/data/tinyshakespeare --config.train.num_steps=20" \
  "$SCRATCH/sc/summary.json"
mkdir -p corpus && cp ../shared/data/tinyshakespeare/input.txt corpus/
step local-text 0 \
  "python -m gptjax.main --config=experiments/shakespeare_char.py:cpu --workdir=$SCRATCH/mytext --config.data.source=text --config.data.path='corpus/*.txt' --config.train.num_steps=20" \
  "$SCRATCH/mytext/summary.json" "$SCRATCH/mytext/tokenizer.json"
step train-tokenizer 0 \
  "python -m gptjax.train_tokenizer --kind=sentencepiece --vocab_size=8000 --input='corpus/*.txt' --output=tok/sp8k.model" \
  tok/sp8k.model
step sentencepiece 0 \
  "python -m gptjax.main --config=experiments/shakespeare_char.py:cpu --workdir=$SCRATCH/sp --config.data.tokenizer=sentencepiece --config.data.tokenizer_path=tok/sp8k.model --config.data.manual_dir=../shared/data/tinyshakespeare --config.train.num_steps=20" \
  "$SCRATCH/sp/summary.json"

# --- GPT-2 weights from and to Hugging Face --------------------------------------------
# /models/gpt2 stands for a downloaded GPT-2: here a random one, 2 layers x 64, with a BPE
# tokenizer.json trained on the corpus; the commands say its shape.
GPT2="$ROOT/models/gpt2"
SHAPE="--config.model.n_layer=2 --config.model.n_head=2 --config.model.d_model=64 --config.model.block_size=64"
step make-gpt2 0 "python - <<'EOF'
import transformers
from gptjax import tokenizer
bpe = tokenizer.BPETokenizer.train([open('corpus/input.txt').read()[:200_000]], 512)
model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
    vocab_size=512, n_positions=64, n_embd=64, n_layer=2, n_head=2))
model.save_pretrained('$GPT2')
open('$GPT2/tokenizer.json', 'w').write(bpe.hf_json)
EOF" "$GPT2/model.safetensors"
step hf-finetune 0 \
  "python -m gptjax.main --config=experiments/gpt2.py:small --workdir=runs/ft --config.init_from=hf:$GPT2 --config.optim.lr=3e-5 $SHAPE --config.data.source=text --config.data.path=corpus/input.txt --config.train.batch_size=8 --config.optim.grad_accum=1 --config.train.num_steps=5 --config.train.eval_batches=2" \
  runs/ft/summary.json
step hf-sample 0 \
  "python -m gptjax.main --mode=sample --config=experiments/gpt2.py:small --config.init_from=hf:$GPT2 $SHAPE --workdir=$SCRATCH/s --prompt='Hello' --max_new_tokens=20"
step hf-export 0 'python -m gptjax.main --mode=export --export_format=hf --workdir=runs/ft' \
  runs/ft/export_hf/model.safetensors runs/ft/export_hf/config.json
step hf-load 0 \
  'python -c "import transformers; transformers.GPT2LMHeadModel.from_pretrained(\"runs/ft/export_hf\")"'

# --- Fine-tuning on conversations, and evaluating it -----------------------------------
step pretrain 0 \
  'python -m gptjax.main --config=experiments/shakespeare_char.py:cpu --workdir=runs/shakespeare_cpu --config.data.manual_dir=../shared/data/tinyshakespeare --config.train.num_steps=200' \
  runs/shakespeare_cpu/summary.json
step fine-tune 0 \
  'python -m gptjax.main --config=experiments/shakespeare_dialogue.py --workdir=runs/dialogue --config.train.num_steps=40 --config.train.eval_every=20' \
  runs/dialogue/summary.json runs/dialogue/checkpoints/40
step evaluate 0 'python -m gptjax.main --mode=evaluate --workdir=runs/dialogue --eval_records=16' \
  runs/dialogue/eval/scores.json runs/dialogue/eval/predictions.jsonl
step evaluate-base 0 \
  'python -m gptjax.main --mode=evaluate --workdir=runs/shakespeare_cpu --eval_template=plain --eval_data=../shared/data/shakespeare_dialogue/validation.jsonl --eval_records=16' \
  runs/shakespeare_cpu/eval/scores.json
step chat 0 \
  'printf "ROMEO: Good morrow, fair maid.\n/quit\n" | python -m gptjax.main --mode=chat --workdir=runs/dialogue --temperature=0 --max_new_tokens=24'

# --- Sharding ---------------------------------------------------------------------------
# GPT-2 on lm1b needs the download, and its meshes are 8 GPUs' (~32 and ~5 GiB per device):
# compile them (no data); a CPU host under ~260 / ~45 GiB of RAM refuses them in one line.
RAM_GIB=$(python3 -c "import os; print(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') // 2**30)")
FSDP_FITS=$((RAM_GIB / 8 > 32 ? 1 : 0))
step fsdp-8 $((1 - FSDP_FITS)) \
  'XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m gptjax.main --mode=compile_only --config=experiments/gpt2.py:small --config.model.vocab_size=50257 --workdir=runs/g --config.mesh.shape.fsdp=8 --config.mesh.shape.data=1 --config.optim.grad_accum=5'
step fsdp-8-says 0 "grep -q 'error: the train step needs ~' '$LAST_LOG' || [ $FSDP_FITS = 1 ]"
MESH_FITS=$((RAM_GIB / 8 > 5 ? 1 : 0))
step mesh-2x2x2 $((1 - MESH_FITS)) \
  'XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m gptjax.main --mode=compile_only --config=experiments/gpt2.py:small --config.model.vocab_size=50257 --workdir=runs/g --config.mesh.shape.data=2 --config.mesh.shape.fsdp=2 --config.mesh.shape.tensor=2'
step mesh-2x2x2-says 0 "grep -q 'error: the train step needs ~' '$LAST_LOG' || [ $MESH_FITS = 1 ]"
step mesh-cpu 0 \
  'XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m gptjax.main --config=experiments/shakespeare_char.py:cpu --workdir=runs/mesh --config.data.manual_dir=../shared/data/tinyshakespeare --config.train.batch_size=16 --config.mesh.shape.data=2 --config.mesh.shape.fsdp=2 --config.mesh.shape.tensor=2 --config.train.num_steps=20' \
  runs/mesh/summary.json
# ~5.3 GiB per device: on a CPU host, 8 simulated devices share its RAM (README says so).
XL_FITS=$((RAM_GIB / 8 > 5 ? 1 : 0))
step compile-only-xl $((1 - XL_FITS)) \
  "XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m gptjax.main --mode=compile_only --config=experiments/gpt2.py:xl --config.model.vocab_size=50257 --workdir=$SCRATCH/xl --config.mesh.shape.fsdp=8 --config.mesh.shape.data=1 --config.optim.grad_accum=60 --config.model.scan_layers=true --config.model.remat=full"

# --- Speed ------------------------------------------------------------------------------
step compile-only-xl-says 0 "grep -q 'needs ~5.3 GiB per device' '$LAST_LOG' || [ $XL_FITS = 1 ]"
# A GPU's shape: a CPU refuses it in seconds, naming the switches (a GPU runs it).
GPT2_FITS=$((RAM_GIB > 31 ? 1 : 0))
step bench-gpt2 $((1 - GPT2_FITS)) \
  'python -m gptjax.bench train --config=experiments/gpt2.py:small --config.train.batch_size=12 --config.optim.grad_accum=1 --steps=2'
step bench-gpt2-says 0 "grep -q 'gptjax.bench: error: the train step needs ~' '$LAST_LOG' || [ $GPT2_FITS = 1 ]"
step bench-char 0 \
  'python -m gptjax.bench train --config=experiments/shakespeare_char.py:cpu --config.model.vocab_size=66'

# --- Checkpoints, sampling, chat ---------------------------------------------------------
step export 0 'python -m gptjax.main --mode=export --workdir=runs/shakespeare_cpu' \
  runs/shakespeare_cpu/export/config.json
step sample 0 \
  'python -m gptjax.main --mode=sample --workdir=runs/shakespeare_cpu --prompt="ROMEO:" --num_samples=3 --max_new_tokens=100 --temperature=0.8 --top_k=200 --top_p=0.95 --seed=0'
step chat-base 0 \
  'printf "Good morrow.\n/reset\nFarewell.\n" | python -m gptjax.main --mode=chat --workdir=runs/shakespeare_cpu --user_name=ROMEO --assistant_name=JULIET --max_new_tokens=24 --stream_tokens=8 --temperature=0.8 --top_k=200'
step bench-decode 0 \
  'python -m gptjax.bench decode --config=experiments/gpt2.py:small --decode_batch=32 --prompt_len=64 --new_tokens=16'

# --- int8 inference ------------------------------------------------------------------------
step int8-sample 0 \
  'python -m gptjax.main --workdir=runs/shakespeare_cpu --mode=sample --quantize=int8 --kv_quant=int8'
step int8-export 0 \
  'python -m gptjax.main --workdir=runs/shakespeare_cpu --mode=export --quantize=int8 --export_dir=runs/shakespeare_cpu/export_int8' \
  runs/shakespeare_cpu/export_int8/config.json

# --- Running an ablation -----------------------------------------------------------------
step sweep 0 \
  'python -m gptjax.sweep --config=experiments/shakespeare_ablation.py --workdir=runs/abl --config.data.manual_dir=../shared/data/tinyshakespeare --config.train.num_steps=30' \
  runs/abl/baseline/summary.json runs/abl/swiglu/summary.json
step report 0 'python -m gptjax.report runs/abl' runs/abl/report.md runs/abl/val_loss.png
step sweep-commands 0 \
  'python -m gptjax.sweep --config=experiments/shakespeare_ablation.py --workdir=runs/abl --config.data.manual_dir=../shared/data/tinyshakespeare --config.train.num_steps=30 --print_commands'

# --- Outputs: TensorBoard ----------------------------------------------------------------
step install-tensorboard 0 'pip install -q -e ".[tensorboard]"'
step tensorboard 0 'tensorboard --logdir runs/shakespeare_cpu --inspect'
if ! grep -q "loss" "$LAST_LOG"; then
  FAILED=$((FAILED + 1)) && echo "FAIL tensorboard: no loss scalars in runs/shakespeare_cpu"
fi

echo "first_hour: $N commands, $FAILED failed, $(($(date +%s) - START))s (logs: $LOGS)"
[ "$FAILED" -eq 0 ]

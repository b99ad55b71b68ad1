#!/usr/bin/env bash
# The main job: tokenise tinyshakespeare with the GPT-NeoX tokenizer, train a Pythia-14M-shaped
# GPT-NeoX on it (configs/train/tinyshakespeare.yaml; a few minutes on a 2-core CPU, the loss
# falling from about 10.9), then print a generated sample from the trained weights.
# Sets up the environment first.  Knobs (environment variables):
#   SHARED  (default ../shared)      holds data/20B_tokenizer.json and data/tinyshakespeare.txt
#   OUT     (default runs/demo)      data and run directory
#   CONFIG  (default configs/train/tinyshakespeare.yaml); any --set overrides go in SET, e.g.
#   SET="--set train.steps=40"
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
VENV=${NEOX_JAX_VENV:-.venv}
SHARED=${NEOX_JAX_SHARED:-../shared}
OUT=${OUT:-runs/demo}
CONFIG=${CONFIG:-configs/train/tinyshakespeare.yaml}
TOKENIZER="$SHARED/data/20B_tokenizer.json"
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
mkdir -p "$OUT/data"
"$VENV/bin/neox-jax" data preprocess "$SHARED/data/tinyshakespeare.txt" --txt-mode blank-lines --append-eod \
  --tokenizer "$TOKENIZER" --output-prefix "$OUT/data/tinyshakespeare" --overwrite
# shellcheck disable=SC2086
"$VENV/bin/neox-jax" train "$CONFIG" --run-dir "$OUT/shakespeare" --overwrite \
  --set data.path="$OUT/data/tinyshakespeare_text_document" ${SET:-}
echo "--- loss curve (step: loss), from $OUT/shakespeare/metrics.jsonl"
"$VENV/bin/python" - "$OUT/shakespeare/metrics.jsonl" <<'PY'
import json, sys
recs = [json.loads(line) for line in open(sys.argv[1])]
train = [r for r in recs if "loss" in r]
every = max(1, len(train) // 12)
print("  " + "  ".join(f"{r['step'] + 1}: {r['loss']:.3f}" for r in train[every - 1::every]))
for r in recs:
    if "valid_loss" in r:
        print(f"  validation at step {r['step']}: loss {r['valid_loss']:.3f} (perplexity {r['valid_ppl']:.1f})")
PY
echo "--- a sample from the trained model (temperature 0.8, top-k 40, seed 0; speeches end with <|endoftext|>)"
"$VENV/bin/neox-jax" generate "$OUT/shakespeare" --tokenizer "$TOKENIZER" --prompt "ROMEO:" \
  --max-new-tokens 80 --temperature 0.8 --top-k 40 --seed 0 --ignore-eod

#!/usr/bin/env bash
# The main job, until the trainer lands: initialise a small preset (pythia-14m shapes) and score
# tinyshakespeare with the real GPT-NeoX tokenizer, printing perplexity.  Sets up the environment first.
#   SHARED (default ../shared) holds data/20B_tokenizer.json and data/tinyshakespeare.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
VENV=${NEOX_JAX_VENV:-.venv}
SHARED=${NEOX_JAX_SHARED:-../shared}
PRESET=${PRESET:-pythia-14m}
OUT=${OUT:-runs/demo}
mkdir -p "$OUT"
"$VENV/bin/neox-jax" init "$PRESET" "$OUT/$PRESET" --seed 0 --overwrite
"$VENV/bin/neox-jax" score "$OUT/$PRESET" --input "$SHARED/data/tinyshakespeare.txt" \
  --tokenizer "$SHARED/data/20B_tokenizer.json" --output "$OUT/tinyshakespeare.scores.jsonl" \
  --dtype float32 --batch-size 2 --overwrite

#!/usr/bin/env bash
# One lent-GPU session of the issue-12 measurement, as one command with a total time budget.
#
#   bash bench/gpu_session.sh BUDGET_S [ARGS...]
#
# Runs bench/train_throughput.py in stages, most important first, each stage's timeout cut to what is
# left of BUDGET_S (a stage with under 60 s left is skipped and says so).  ARGS are appended to every
# stage before the stage's own options, so the stage's options win (used for the CPU smoke run below).
# Results: $OUT (or /tmp/out) gets session.log and one JSON per stage; each JSON is rewritten after
# every job inside its stage, so a stage cut short keeps what it finished.
#
#   stage 1  the issue's measurement: cudnn-vs-xla attention check, ours, HF eager, HF + torch.compile
#            (pythia-1.4b, seq 2048, micro-batch 8, bf16 compute, fp32 params/AdamW, remat dots)
#   stage 2  lever 2: ours with --remat none (prediction in bench/throughput_notes.md: +5-8%)
#   stage 3  lever 4: ours with --remat none --micro-batch 16 (prediction: +3-5% over stage 2)
#   stage 4  parallel vs sequential residual: prefill, decode step and train step, ours only
#
# GPU (what the lent machine ran; nothing to install):
#   PYTHONPATH=. bash bench/gpu_session.sh 570          (PYTHON=... to use another interpreter than python3)
# CPU smoke run of the same stages (tiny shapes; cudnn and the attention check need a GPU):
#   JAX_PLATFORMS=cpu PYTHONPATH=. bash bench/gpu_session.sh 900 --model tiny --seq 64 --micro-batch 2 \
#       --steps 2 --warmup 1 --attention xla --dtype float32
set -uo pipefail
cd "$(dirname "$0")/.."
budget=${1:?usage: bench/gpu_session.sh BUDGET_S [ARGS...]}
shift
out=${OUT:-/tmp/out}
mkdir -p "$out"
log="$out/session.log"
deadline=$((SECONDS + budget))
export PYTHONUNBUFFERED=1

{
  echo "=== $(date -u '+%Y-%m-%d %H:%M:%S') budget ${budget}s; git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi -L 2>/dev/null || echo "(no nvidia-smi)"
} | tee "$log"

stage() {  # stage NAME CAP_S ARGS...
  local name=$1 cap=$2
  shift 2
  local left=$((deadline - SECONDS - 5))
  if ((left < 60)); then
    echo "=== stage $name skipped: ${left}s left" | tee -a "$log"
    return
  fi
  local t=$((cap < left ? cap : left))
  echo "=== stage $name (timeout ${t}s): $*" | tee -a "$log"
  local start=$SECONDS
  timeout --kill-after=5 "$t" "${PYTHON:-python3}" bench/train_throughput.py --json "$out/$name.json" "$@" 2>&1 | tee -a "$log"
  echo "=== stage $name exit ${PIPESTATUS[0]} after $((SECONDS - start))s" | tee -a "$log"
}

stage s1_issue 400 "$@" --job-timeout 200
stage s2_remat_none 150 "$@" --sides ours --no-check-attention --remat none --job-timeout 140
stage s3_remat_none_mb16 150 "$@" --sides ours --no-check-attention --remat none --micro-batch 16 --job-timeout 140
stage s4_residual 240 "$@" --sides ours --no-check-attention --parallel-residual both --steps 5 --job-timeout 100
echo "=== done after ${SECONDS}s" | tee -a "$log"

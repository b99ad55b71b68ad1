#!/usr/bin/env bash
# One lent-GPU session of the issue-12 measurement, as one command with a total time budget.
#
#   bash bench/gpu_session.sh BUDGET_S [ARGS...]
#
# Runs the benchmark scripts in stages, most important first, each stage's timeout cut to what is left
# of BUDGET_S (a stage with under 60 s left is skipped and says so).  ARGS are appended to every
# train_throughput stage before the stage's own options, so the stage's options win (used for the CPU
# smoke run below).  Results: $OUT (or /tmp/out) gets session.log and one JSON per stage; each JSON is
# rewritten after every job inside its stage, so a stage cut short keeps what it finished.
#
# Second session's stages (the first session's results: bench/results/h200-2026-11-26/; predictions
# are written in bench/throughput_notes.md, "Second GPU session", before any of these ran):
#   s1  the issue's measurement again (cudnn-vs-xla check, ours, HF eager, HF + torch.compile), now with
#       the bf16 head backward and the written-out LayerNorm/GELU backward
#   s2  remat dots_attn (cuDNN attention's forward outputs saved), micro-batch 8
#   s3  remat none, micro-batch 8 (no float32 LayerNorm residuals any more)
#   s4  remat none, micro-batch 16, then 24 (s4b)
#   s5  remat dots_attn, micro-batch 24
#   s6  remat dots_attn, micro-batch 8, the cross-entropy over the whole sequence (train.loss_chunk 0)
#   s6b remat dots_attn, micro-batch 8, model.fp32_allreduce (its cost on one GPU)
#   s7  the collectives of the 1.4b step on (1,1,1) (this GPU) and (8,1,1) (8 CPU devices)
#   s8  a profile of remat dots_attn, micro-batch 8 (bench/profile_step.py)
#   s9-s12  each flag of launch/xla_gpu_flags.sh alone (together they cost 7.9% in session one)
#   s13-s14 decoding (ours, HF generate; ours with int8 weights)
#   s15 one decode step per call, float32-stored weights vs model.inference_params (what export stores)
#
# GPU (what the lent machine runs; nothing to install):
#   PYTHONPATH=. bash bench/gpu_session.sh 600          (PYTHON=... to use another interpreter than python3)
# CPU smoke run of the same stages (tiny shapes; cudnn and the attention check need a GPU, so the
# dots_attn stages fail fast there with a ConfigError, which the smoke run shows as "exit 1"):
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

# The memory fraction the launchers use (launch/xla_gpu_flags.sh): JAX's default 0.75 refused remat none at
# micro-batch 16 in session one although it fit the card.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}

stage() {  # stage NAME CAP_S SCRIPT ARGS...
  local name=$1 cap=$2 script=$3
  shift 3
  local left=$((deadline - SECONDS - 5))
  if ((left < 60)); then
    echo "=== stage $name skipped: ${left}s left" | tee -a "$log"
    return
  fi
  local t=$((cap < left ? cap : left))
  echo "=== stage $name (timeout ${t}s, XLA_FLAGS='${XLA_FLAGS:-}'): $script $*" | tee -a "$log"
  local start=$SECONDS
  timeout --kill-after=5 "$t" "${PYTHON:-python3}" "bench/$script" --json "$out/$name.json" "$@" 2>&1 | tee -a "$log"
  echo "=== stage $name exit ${PIPESTATUS[0]} after $((SECONDS - start))s" | tee -a "$log"
}

tt=train_throughput.py
ours=(--sides ours --no-check-attention)
stage s1_issue 300 $tt "$@" --job-timeout 200
stage s2_dots_attn 90 $tt "$@" "${ours[@]}" --remat dots_attn --job-timeout 80
stage s3_remat_none 90 $tt "$@" "${ours[@]}" --remat none --job-timeout 80
stage s4_remat_none_mb16 90 $tt "$@" "${ours[@]}" --remat none --micro-batch 16 --job-timeout 80
stage s4b_remat_none_mb24 100 $tt "$@" "${ours[@]}" --remat none --micro-batch 24 --job-timeout 90
stage s5_dots_attn_mb24 100 $tt "$@" "${ours[@]}" --remat dots_attn --micro-batch 24 --job-timeout 90
stage s6_loss_chunk_whole 90 $tt "$@" "${ours[@]}" --remat dots_attn --loss-chunk 0 --job-timeout 80
stage s6b_fp32_allreduce 90 $tt "$@" "${ours[@]}" --remat dots_attn --fp32-allreduce --job-timeout 80
stage s7_collectives 120 $tt "$@" "${ours[@]}" --collectives --steps 3 --warmup 1 --job-timeout 110
stage s8_profile 90 profile_step.py "$@" --remat dots_attn --steps 3
for flag in --xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_triton_gemm=false \
            --xla_gpu_enable_cublaslt=true --xla_gpu_enable_highest_priority_async_stream=true; do
  name=${flag#--xla_gpu_enable_}
  XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }$flag" stage "flag_${name%%=*}" 70 $tt "$@" "${ours[@]}" --job-timeout 60
done
# decoding (pythia-1.4b, bf16, greedy): ours beside HF generate, then ours with int8 weights (generate --int8)
stage s13_decode 150 decode_throughput.py --gpu --batches 1,32 --new 128 --timeout 140
stage s14_decode_int8 90 decode_throughput.py --gpu --batches 1,32 --new 128 --int8 --no-hf --timeout 80
# one decode step per call (an exported or served model), float32-stored weights vs model.inference_params
stage s15_per_call_decode 90 per_call_decode.py --gpu --batches 1,8
echo "=== done after ${SECONDS}s" | tee -a "$log"

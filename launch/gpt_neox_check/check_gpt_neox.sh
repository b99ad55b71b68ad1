#!/usr/bin/env bash
# Checks neox-jax's GPT-NeoX converter against GPT-NeoX's OWN code (megatron.* + DeeperSpeed), run on
# CPU with tensor parallelism over torch.distributed gloo (one process per TP rank, torch.distributed.run).
#
#   GPT_NEOX=/path/to/gpt-neox NEOX_VENV=/path/to/venv ./check_gpt_neox.sh
#
# Optional: NEOX_JAX (default: this repository), JAX_PY (default $NEOX_JAX/.venv/bin/python),
#           WORK (scratch dir, default: a fresh mktemp dir), TOL (max abs logit diff, default 1e-4),
#           PORT (default 29511), CASES_A / CASES_B (space-separated subsets of the case names below).
#
# Goal A  (neox-jax writer -> GPT-NeoX loader): tiny random HF GPTNeoXForCausalLM (transformers, fp32) ->
#         `neox-jax convert --to neox --tp T` -> GPT-NeoX's setup_model_and_optimizer + load_checkpoint
#         (DeepSpeed PipelineEngine) -> GPT2ModelPipe forward; logits vs HF's.
#         Files and YAML as written (--neox-names for the checkout), with no_load_rng as docs/convert.md
#         says. Probes on the first case: P1 NeoXArgs' type check of our YAML (counted), P2 a load with
#         RNG loading on, which stops (reported only: our mp_rank files hold no RNG state).
# Goal B  (GPT-NeoX writer -> neox-jax reader): GPT2ModelPipe randomly initialised by GPT-NeoX's own init
#         (use_cpu_initialization) + a rank-consistent perturbation, saved by megatron.checkpointing.
#         save_checkpoint (DeepSpeed engine.save_checkpoint), forward logits recorded; then
#         `neox-jax convert CKPT HF --to hf` and transformers' logits vs GPT-NeoX's.
#
# Exit status: 0 when every numeric case ran and is within TOL; 1 otherwise.
set -u -o pipefail

: "${GPT_NEOX:?set GPT_NEOX to a GPT-NeoX checkout}"
: "${NEOX_VENV:?set NEOX_VENV to the venv with torch (CPU), DeeperSpeed and GPT-NeoX requirements}"
NEOX_JAX=${NEOX_JAX:-$(cd "$(dirname "$0")/../.." && pwd)}
JAX_PY=${JAX_PY:-$NEOX_JAX/.venv/bin/python}
TOL=${TOL:-1e-4}
PORT=${PORT:-29511}
HERE=$(cd "$(dirname "$0")" && pwd)
GPT_NEOX=$(cd "$GPT_NEOX" && pwd)
WORK=${WORK:-$(mktemp -d /tmp/check_gpt_neox.XXXXXX)}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
RESULTS=$WORK/results.tsv
: > "$RESULTS"
CASES_A=${CASES_A:-"par_gelu_tp2 seq_gelu_tp2 par_gelufast_tp2 par_gelu_tp1 par_tied_tp2"}
CASES_B=${CASES_B:-"par_gelu_tp2 seq_gelu_tp2 par_fusion_tp2 par_tied_tp2"}

# GPT-NeoX side: its venv first on PATH (megatron/data/Makefile runs `python3 -m pybind11`), GPT-NeoX importable
NEOX_PY=$NEOX_VENV/bin/python
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
neox_env() { env PATH="$NEOX_VENV/bin:$PATH" PYTHONPATH="$GPT_NEOX" "$@"; }
say() { printf '\n== %s\n' "$*"; }
fail=0

# run_neox NPROC LOG driver-args...: GPT-NeoX driver on NPROC gloo ranks, from the checkout
run_neox() {
  local n=$1 log=$2; shift 2
  (cd "$GPT_NEOX" && neox_env timeout 900 "$NEOX_PY" -m torch.distributed.run --nproc_per_node "$n" \
     --master_port "$PORT" "$HERE/neox_driver.py" "$@") > "$log" 2>&1
  local rc=$?
  PORT=$((PORT + 1))
  return $rc
}
# the line that says why a GPT-NeoX run stopped
why() { grep -v -e real_accelerator -e 'error_file' -e 'Mamba' -e 'ChildFailedError' -e 'elastic' "$1" \
        | grep -E 'Error|Unable|Missing key|Unexpected key|exiting' | sed 's/^\[rank[0-9]\]: //' | sort -u | head -4; }
compare() { "$JAX_PY" "$HERE/compare.py" "$@" "$TOL" "$RESULTS" || fail=1; }

echo "GPT-NeoX:  $GPT_NEOX ($(git -C "$GPT_NEOX" rev-parse --short HEAD 2>/dev/null || echo '?'))"
echo "venv:      $NEOX_VENV (torch $("$NEOX_PY" -c 'import torch;print(torch.__version__)'), deepspeed $("$NEOX_PY" -W ignore -c 'import deepspeed;print(deepspeed.__version__)' 2>/dev/null | tail -1))"
echo "neox-jax:  $NEOX_JAX ($(git -C "$NEOX_JAX" rev-parse --short HEAD 2>/dev/null || echo '?')), $JAX_PY"
echo "work dir:  $WORK   tolerance: max|logit diff| <= $TOL"

"$JAX_PY" "$HERE/hf_side.py" tokens "$WORK/tokens.npy" || exit 1

# ------------------------------------------------------------------------------------------ goal A
first=1
for c in $CASES_A; do
  case $c in
    par_gelu_tp2)     par=1 act=gelu      tied=0 tp=2 ;;
    seq_gelu_tp2)     par=0 act=gelu      tied=0 tp=2 ;;
    par_gelufast_tp2) par=1 act=gelu_fast tied=0 tp=2 ;;
    par_gelu_tp1)     par=1 act=gelu      tied=0 tp=1 ;;
    seq_gelu_tp1)     par=0 act=gelu      tied=0 tp=1 ;;
    par_tied_tp2)     par=1 act=gelu      tied=1 tp=2 ;;
    *) echo "unknown goal A case $c"; exit 2 ;;
  esac
  say "A/$c: HF (parallel_residual=$par, hidden_act=$act, tied=$tied) -> neox-jax --to neox --tp $tp -> GPT-NeoX"
  d=$WORK/A/$c
  mkdir -p "$d"
  cp "$WORK/tokens.npy" "$d/tokens.npy"
  "$JAX_PY" "$HERE/hf_side.py" make "$d/hf" --parallel $par --act $act --tied $tied > "$d/hf.log" 2>&1 \
    || { echo "HF model failed: $(tail -2 "$d/hf.log")"; fail=1; continue; }
  # the layer-file names of this checkout: linear1/linear2 since GPT-NeoX #1212 (Sep 2024), else v1.0/v2.0's
  if grep -q 'self.linear1 = ' "$GPT_NEOX/megatron/model/transformer.py"; then names=current; else names=legacy; fi
  (cd "$NEOX_JAX" && "$JAX_PY" -m neox_jax convert "$d/hf" "$d/ours" --to neox --tp $tp --neox-names $names) \
    > "$d/convert.log" 2>&1 \
    || { echo "neox-jax convert --to neox failed: $(tail -2 "$d/convert.log")"; echo "A/$c	convert failed	-	FAIL" >> "$RESULTS"; fail=1; continue; }
  step=$(cat "$d/ours/latest")
  yml=$d/ours/$step/configs
  # between #1168 and #1212 (Mar-Sep 2024) the legacy names came without a persistent inv_freq buffer: the
  # run's config then needs rotary-save-freqs-buffer: true (docs/convert.md), added to a copy of the YAML
  if [ $names = legacy ] && grep -q 'rotary_save_freqs_buffer' "$GPT_NEOX/megatron/neox_arguments/neox_args.py"; then
    neox_env "$NEOX_PY" "$HERE/adapt_ckpt.py" fixyaml "$yml" "$d/yml_freqs" --save-freqs 2>/dev/null
    yml=$d/yml_freqs; extra=", rotary-save-freqs-buffer: true"
  else extra=""; fi
  if [ $first = 1 ]; then
    first=0
    echo "-- P1: GPT-NeoX's NeoXArgs type check on our YAML"
    if neox_env "$NEOX_PY" "$HERE/adapt_ckpt.py" yamltypes "$yml"/*.yml 2>/dev/null; then echo "   P1 accepted"
    else echo "   P1 refused (NeoXArgs.validate_types)"; fail=1; fi
    echo "-- P2: GPT-NeoX's load_checkpoint with RNG loading on (its default): our mp_rank files hold no RNG state"
    if run_neox $tp "$d/probe_rng.log" load --yml "$yml"/*.yml --load "$d/ours" \
         --tokens "$d/tokens.npy" --out "$d/probe_rng.npy" && [ -f "$d/probe_rng.npy" ]; then echo "   P2 loaded"
    else echo "   P2 stopped without logits (GPT-NeoX sys.exit()s, status 0), as docs/convert.md says: $(why "$d/probe_rng.log" | head -1)"; fi
  fi
  echo "-- numeric: layer files and YAML as written ($names names$extra), no_load_rng; TP=$tp ranks"
  if run_neox $tp "$d/load.log" load --no-load-rng --yml "$yml"/*.yml --load "$d/ours" \
       --tokens "$d/tokens.npy" --out "$d/neox_logits.npy"; then
    grep -h -e 'validated currently set args' -e 'successfully loaded' "$d/load.log" | sed 's/\[rank [0-9]\] *$//' | sort -u | sed 's/^/   GPT-NeoX: /'
  else echo "   GPT-NeoX run failed: $(why "$d/load.log" | head -2)"; fi
  compare "A/$c" "$d/hf/hf_logits.npy" "$d/neox_logits.npy"
done

# ------------------------------------------------------------------------------------------ goal B
"$JAX_PY" -c "import sys; sys.path.insert(0, '$HERE'); import hf_side, pathlib; \
hf_side.write_tokenizer(pathlib.Path('$WORK/tokenizer.json'))"
for c in $CASES_B; do
  case $c in
    par_gelu_tp2)   gptj=true  fusion=false tying=true  tp=2 ;;
    seq_gelu_tp2)   gptj=false fusion=false tying=true  tp=2 ;;
    par_fusion_tp2) gptj=true  fusion=true  tying=true  tp=2 ;;
    seq_fusion_tp2) gptj=false fusion=true  tying=true  tp=2 ;;
    par_tied_tp2)   gptj=true  fusion=false tying=false tp=2 ;;
    par_gelu_tp1)   gptj=true  fusion=false tying=true  tp=1 ;;
    *) echo "unknown goal B case $c"; exit 2 ;;
  esac
  say "B/$c: GPT-NeoX init+save (gpt-j-residual=$gptj, bias-gelu-fusion=$fusion, no-weight-tying=$tying, TP=$tp) -> neox-jax --to hf -> transformers"
  d=$WORK/B/$c
  mkdir -p "$d"
  cat > "$d/model.yml" <<EOF
# check_gpt_neox.sh goal B: tiny GPT-NeoX model, pipeline layout (pipe-parallel-size 1), fp32
pipe-parallel-size: 1
model-parallel-size: $tp
num-layers: 2
hidden-size: 128
num-attention-heads: 4
seq-length: 64
max-position-embeddings: 64
pos-emb: rotary
rotary-pct: 0.25
rotary-emb-base: 10000
norm: layernorm
layernorm-epsilon: 1.0e-05
gpt-j-residual: $gptj
no-weight-tying: $tying
activation: gelu
bias-gelu-fusion: $fusion
output-layer-parallelism: column
attention-config: [[["global"], 2]]
scaled-upper-triang-masked-softmax-fusion: false
init_method: normal
output_layer_init_method: scaled_normal
init-method-std: 0.08
precision: fp32
tokenizer-type: HFTokenizer
vocab-file: $WORK/tokenizer.json
make-vocab-size-divisible-by: 128
checkpoint-factor: 100
EOF
  if ! run_neox $tp "$d/save.log" save --perturb --yml "$d/model.yml" --save "$d/ckpt" \
       --tokens "$WORK/tokens.npy" --out "$d/neox_logits.npy"; then
    echo "   GPT-NeoX save failed: $(why "$d/save.log" | head -2)"; echo "B/$c	neox save failed	-	FAIL" >> "$RESULTS"; fail=1; continue
  fi
  echo "   GPT-NeoX wrote: $(cd "$d/ckpt" && ls "$(cat latest)" | tr '\n' ' ')"
  (cd "$NEOX_JAX" && "$JAX_PY" -m neox_jax convert "$d/ckpt" "$d/hf" --to hf) > "$d/convert.log" 2>&1 \
    || { echo "   neox-jax convert --to hf failed: $(grep -h 'error' "$d/convert.log" | tail -2)"; echo "B/$c	convert failed	-	FAIL" >> "$RESULTS"; fail=1; continue; }
  "$JAX_PY" "$HERE/hf_side.py" logits "$d/hf" "$WORK/tokens.npy" "$d/hf_logits.npy" > "$d/hf.log" 2>&1
  compare "B/$c" "$d/neox_logits.npy" "$d/hf_logits.npy"
done

say "summary ($RESULTS)"
column -t -s $'\t' "$RESULTS"
if [ $fail = 0 ]; then echo "ALL OK (tolerance $TOL)"; else echo "SOME CASES FAILED (tolerance $TOL)"; fi
exit $fail

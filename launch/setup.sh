#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install neox-jax with its test extras.
# Idempotent: reinstalls only when pyproject.toml changed.  VENV defaults to ./.venv.
# NEOX_JAX_CONSTRAINTS: a pip constraints file pinning other versions (launch/test_gpu_versions.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${NEOX_JAX_VENV:-.venv}
PY=${PYTHON:-python3}
CONSTRAINTS=${NEOX_JAX_CONSTRAINTS:-}
pin=()
torch_req=torch==2.13.0
if [ -n "$CONSTRAINTS" ]; then
  pin=(-c "$CONSTRAINTS")
  torch_req=torch  # the constraints say which
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q -U pip
fi
stamp="$VENV/.neox_jax_installed"
want=$(cat pyproject.toml launch/setup.sh ${CONSTRAINTS:+"$CONSTRAINTS"} | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  # The CPU build of torch first: a plain `torch` requirement would pull a multi-GB CUDA build.  (With
  # NEOX_JAX_CONSTRAINTS, the torch they pin, whichever build that is.)
  "$VENV/bin/pip" install -q "${pin[@]}" "$torch_req"
  "$VENV/bin/pip" install -q "${pin[@]}" -e ".[test]"
  # `neox-jax plan --target h100|h200` compiles with XLA's GPU compiler on any machine (no GPU): JAX's CUDA
  # plugin of this jax version and cuDNN's library, kept in VENV/gpu-target apart from the environment
  # (installed there, the plugin would make JAX look for a GPU at every start).  About 1.2 GB.
  jaxver=$("$VENV/bin/python" -c 'import jax; print(jax.__version__)')
  rm -rf "$VENV/gpu-target"
  "$VENV/bin/pip" install -q --no-deps --target "$VENV/gpu-target" "jax-cuda12-plugin==$jaxver" \
    "jax-cuda12-pjrt==$jaxver" nvidia-cudnn-cu12==9.28.0.42
  echo "$want" > "$stamp"
fi
echo "environment ready: $VENV ($("$VENV/bin/python" -c 'import jax, flax; print("jax", jax.__version__, "flax", flax.__version__)'))"

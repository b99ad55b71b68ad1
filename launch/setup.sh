#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install neox-jax with its test extras.
# Idempotent: reinstalls only when pyproject.toml changed.  VENV defaults to ./.venv.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${NEOX_JAX_VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q -U pip
fi
stamp="$VENV/.neox_jax_installed"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  # The CPU build of torch first: a plain `torch` requirement would pull a multi-GB CUDA build.
  "$VENV/bin/pip" install -q torch==2.13.0
  "$VENV/bin/pip" install -q -e ".[test]"
  echo "$want" > "$stamp"
fi
echo "environment ready: $VENV ($("$VENV/bin/python" -c 'import jax, flax; print("jax", jax.__version__, "flax", flax.__version__)'))"

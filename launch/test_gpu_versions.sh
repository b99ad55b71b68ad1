#!/usr/bin/env bash
# The test suite under the GPU machine's versions, on this CPU: Python 3.12, jax 0.11.2, flax 0.12.10,
# orbax-checkpoint 0.12.4, transformers 5.17, torch 2.11 (launch/gpu_machine_versions.txt), in a second
# environment (.venv-gpu-versions, about 9 GB: torch 2.11 has no CPU-only wheel here).  The project
# pins ranges covering both machines; CI runs the CPU machines' versions (launch/test.sh), this runs
# the other end of the ranges.  Arguments go to pytest, as with launch/test.sh.  tests/export_test.py
# fails here by design: TensorFlow 2.21 cannot load jax 0.11's jax2tf output, and export refuses.
#   PYTHON312=/path/to/python3.12 bash launch/test_gpu_versions.sh -q tests/model_test.py
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON312:-$(command -v python3.12 || true)}
[ -n "$py" ] || py=$(ls -d "$HOME"/.pyenv/versions/3.12*/bin/python 2>/dev/null | tail -1)
if [ -z "$py" ] || [ ! -x "$py" ]; then
  echo "test_gpu_versions.sh: no Python 3.12 found (set PYTHON312)" >&2
  exit 2
fi
export PYTHON=$py NEOX_JAX_VENV=${NEOX_JAX_VENV:-.venv-gpu-versions} NEOX_JAX_CONSTRAINTS=launch/gpu_machine_versions.txt
exec bash launch/test.sh "$@"

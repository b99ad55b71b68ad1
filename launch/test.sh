#!/usr/bin/env bash
# The test suite: every test runs on CPU; 8 simulated devices for the sharding tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
VENV=${NEOX_JAX_VENV:-.venv}
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8"
export JAX_PLATFORMS=cpu
export TOKENIZERS_PARALLELISM=false
exec "$VENV/bin/python" -m pytest -n "${NEOX_JAX_TEST_WORKERS:-2}" --durations=15 "$@"

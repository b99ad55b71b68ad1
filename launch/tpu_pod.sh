#!/usr/bin/env bash
# neox-jax training on a Cloud TPU pod slice: the same command on every host of the slice
# (`gcloud compute tpus tpu-vm ssh --worker=all`); JAX finds the other hosts itself
# (NEOX_JAX_DISTRIBUTED=auto: jax.distributed reads the TPU metadata).  Run from your workstation:
#
#   TPU_NAME=my-v5p-256 ZONE=us-east5-a CONFIG=configs/train/pythia-12b.yaml \
#     RUN_DIR=/mnt/shared/runs/12b launch/tpu_pod.sh [neox-jax train options...]
#
# Knobs (environment):
#   TPU_NAME, ZONE        the TPU VM slice (required); PROJECT: gcloud project (default: gcloud's)
#   CONFIG                run config, a path inside REPO_DIR on the hosts (required)
#   RUN_DIR               run directory on a filesystem every host mounts (NFS/Filestore; required)
#   REPO_DIR              the checkout on every host (default ~/neox-jax; copy it with
#                         `gcloud compute tpus tpu-vm scp --worker=all` or clone it there first)
#   NEOX_JAX              the command on the hosts (default: neox-jax)
#   mesh.dcn_*            multislice: data across slices by default (mesh.dcn_data: 0 = one per slice)
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${CONFIG:?set CONFIG}" "${RUN_DIR:?set RUN_DIR}"
REPO_DIR=${REPO_DIR:-'~/neox-jax'}
NEOX_JAX=${NEOX_JAX:-neox-jax}
# what every host runs (quoted heredoc: expanded on the host, not here)
read -r -d '' REMOTE <<'SCRIPT' || true
set -euo pipefail
cd "$REPO_DIR"
export NEOX_JAX_DISTRIBUTED=auto
exec $NEOX_JAX train "$CONFIG" --run-dir "$RUN_DIR" "$@"
SCRIPT
args=""
if (($#)); then args=$(printf ' %q' "$@"); fi  # (printf with no arguments would give one empty one)
case $REPO_DIR in  # quoted for the host's shell, a leading ~ left to it (the host's home)
  "~") repo='"$HOME"' ;;
  "~/"*) repo="\"\$HOME\"/$(printf %q "${REPO_DIR#"~/"}")" ;;
  *) repo=$(printf %q "$REPO_DIR") ;;
esac
env_line="REPO_DIR=$repo CONFIG=$(printf %q "$CONFIG") RUN_DIR=$(printf %q "$RUN_DIR") NEOX_JAX=$(printf %q "$NEOX_JAX")"
exec gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" ${PROJECT:+--project "$PROJECT"} --worker=all \
  --command "$env_line bash -c $(printf %q "$REMOTE") neox-jax$args"

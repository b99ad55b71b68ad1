#!/usr/bin/env bash
# N training processes on this machine, joined by jax.distributed: for testing the multi-process path
# on CPU, and for one node with several GPUs (one process per GPU, or per group of GPUs).
#
#   launch/local.sh CONFIG RUN_DIR [neox-jax train options...]
#   NPROC=2 DEVICES_PER_PROCESS=4 launch/local.sh configs/train/tinyshakespeare.yaml runs/two
#
# Knobs (environment):
#   NPROC                processes to start (default 2)
#   PORT                 coordinator port on 127.0.0.1 (default 12321 + a number from this shell's pid)
#   PLATFORM             cpu | gpu (default: gpu when nvidia-smi lists a GPU, else cpu)
#   DEVICES_PER_PROCESS  cpu: simulated devices per process (XLA's host device count; default 1)
#                        gpu: GPUs per process, given to each as CUDA_VISIBLE_DEVICES (default 1)
#   NEOX_JAX             the command (default: neox-jax; e.g. "python -m neox_jax")
#   XLA_FLAGS_FILE       gpu: sourced for XLA_FLAGS (default launch/xla_gpu_flags.sh)
#   LOG_DIR              where processes 1..N-1 write their output (default RUN_DIR.logs); process 0
#                        writes to this terminal
#   STOP_GRACE_S         after a process stopped on SIGTERM/SIGINT (exit 143/130, its checkpoint
#                        written), how long the others may take to finish theirs (default 300)
# Exit status: the first failing status of any process (the others are stopped); 143/130 when the
# run was stopped by a signal (every process waited for); else 0.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  sed -n '2,20p' "$0" >&2
  exit 2
fi
HERE="$(cd "$(dirname "$0")" && pwd)"
CONFIG=$1 RUN_DIR=$2
shift 2
NPROC=${NPROC:-2}
PORT=${PORT:-$((12321 + $$ % 20000))}
DEVICES_PER_PROCESS=${DEVICES_PER_PROCESS:-1}
NEOX_JAX=${NEOX_JAX:-neox-jax}
STOP_GRACE_S=${STOP_GRACE_S:-300}
for knob in NPROC DEVICES_PER_PROCESS PORT STOP_GRACE_S; do  # whole numbers >= 1, checked before anything starts
  if ! [[ ${!knob} =~ ^[1-9][0-9]*$ ]]; then
    echo "launch/local.sh: $knob must be a whole number >= 1, got '${!knob}'" >&2
    exit 2
  fi
done
if ((PORT > 65535)); then echo "launch/local.sh: PORT must be <= 65535, got $PORT" >&2; exit 2; fi
if [[ -n "${PLATFORM:-}" && $PLATFORM != cpu && $PLATFORM != gpu ]]; then
  echo "launch/local.sh: PLATFORM must be cpu or gpu, got '$PLATFORM'" >&2
  exit 2
fi
if [[ -z "${PLATFORM:-}" ]]; then
  if command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q GPU; then PLATFORM=gpu; else PLATFORM=cpu; fi
fi
LOG_DIR=${LOG_DIR:-$RUN_DIR.logs}
mkdir -p "$LOG_DIR"

export NEOX_JAX_COORDINATOR="127.0.0.1:$PORT" NEOX_JAX_NUM_PROCESSES=$NPROC
if [[ $PLATFORM == cpu ]]; then
  export JAX_PLATFORMS=cpu
  export XLA_FLAGS="$(echo "${XLA_FLAGS:-}" | sed 's/--xla_force_host_platform_device_count=[0-9]*//') --xla_force_host_platform_device_count=$DEVICES_PER_PROCESS"
else
  # shellcheck source=launch/xla_gpu_flags.sh
  source "${XLA_FLAGS_FILE:-$HERE/xla_gpu_flags.sh}"
fi

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM
for ((i = 0; i < NPROC; i++)); do
  (
    export NEOX_JAX_PROCESS_ID=$i
    if [[ $PLATFORM == gpu ]]; then
      export CUDA_VISIBLE_DEVICES=$(seq -s, $((i * DEVICES_PER_PROCESS)) $(((i + 1) * DEVICES_PER_PROCESS - 1)))
    fi
    if ((i > 0)); then exec >"$LOG_DIR/process-$i.log" 2>&1; fi
    # the same command line as launch/slurm.sbatch, launch/tpu_pod.sh and launch/k8s-jobset.yaml:
    exec $NEOX_JAX train "$CONFIG" --run-dir "$RUN_DIR" "$@"
  ) &
  pids+=($!)
done
status=0 grace=0
# poll: a failed process stops the rest (they would otherwise wait for it until a timeout).  One that
# stopped on SIGTERM/SIGINT (143/130) checkpointed with the others, which stop after the same step:
# they are given STOP_GRACE_S to finish that checkpoint rather than signalled in the middle of it.
declare -A done=()
while ((${#done[@]} < NPROC)); do
  for p in "${pids[@]}"; do
    [[ -n "${done[$p]:-}" ]] && continue
    kill -0 "$p" 2>/dev/null && continue
    rc=0; wait "$p" || rc=$?
    done[$p]=1
    if ((rc == 130 || rc == 143)); then
      ((status)) || status=$rc
      ((grace)) || grace=$((SECONDS + $STOP_GRACE_S))
    elif ((rc != 0)); then
      echo "launch/local.sh: process $p exited with status $rc; stopping the others (logs: $LOG_DIR)" >&2
      exit $rc
    fi
  done
  if ((grace && SECONDS > grace && ${#done[@]} < NPROC)); then
    echo "launch/local.sh: processes still running $STOP_GRACE_S s after one stopped on a signal; stopping them" >&2
    exit $status
  fi
  sleep 0.5
done
exit $status

#!/usr/bin/env bash
# A one-node SLURM cluster on this machine (munged + slurmctld + slurmd, a generated slurm.conf in a
# temporary directory), then launch/slurm.sbatch submitted with 2 tasks x 4 CPU devices: proof that
# the batch script's processes find each other and train together.  Needs root and Debian's
# slurm-wlm and munge (installed with apt-get when missing).  Prints the job's output and the losses.
#
#   launch/slurm_localhost.sh CONFIG [neox-jax train options...]
#
# Knobs (environment):
#   NTASKS               processes (default 2)
#   DEVICES_PER_PROCESS  simulated CPU devices per process (default 4)
#   NEOX_JAX             the command the job runs (default: neox-jax)
#   KEEP                 1: leave the daemons running and the temporary directory in place
set -euo pipefail
CONFIG=$(realpath "${1:?usage: launch/slurm_localhost.sh CONFIG [train options...]}")
shift
REPO="$(cd "$(dirname "$0")/.." && pwd)"
NTASKS=${NTASKS:-2}
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends slurm-wlm munge >&2
fi
T=$(mktemp -d /tmp/neox-slurm.XXXXXX)
host=$(hostname -s)
pids=()
cleanup() {
  [[ ${KEEP:-0} == 1 ]] && { echo "left running; state in $T" >&2; return; }
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 1
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
}
trap cleanup EXIT INT TERM
mkdir -p "$T"/{state,spool,munge}
# munge: our own key and socket, so nothing system-wide is touched
dd if=/dev/urandom of="$T/munge/munge.key" bs=1 count=1024 status=none
chmod 400 "$T/munge/munge.key"
munged --force --key-file "$T/munge/munge.key" --socket "$T/munge/socket" --pid-file "$T/munge/pid" \
  --log-file "$T/munge/log" --seed-file "$T/munge/seed"
pids+=("$(cat "$T/munge/pid")")
cat >"$T/slurm.conf" <<EOF
ClusterName=neoxlocal
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$T/munge/socket
CredType=cred/munge
SlurmctldPort=$((16817 + $$ % 1000))
SlurmdPort=$((17817 + $$ % 1000))
StateSaveLocation=$T/state
SlurmdSpoolDir=$T/spool
SlurmctldPidFile=$T/slurmctld.pid
SlurmdPidFile=$T/slurmd.pid
SlurmctldLogFile=$T/slurmctld.log
SlurmdLogFile=$T/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
NodeName=$host CPUs=$(nproc) State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
EOF
export SLURM_CONF="$T/slurm.conf"
slurmctld -f "$SLURM_CONF" -D >"$T/slurmctld.out" 2>&1 &
pids+=($!)
slurmd -f "$SLURM_CONF" -D >"$T/slurmd.out" 2>&1 &
pids+=($!)
for _ in $(seq 60); do sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed)' && break; sleep 1; done
sinfo -h -o %T 2>/dev/null | grep -qE "^(idle|mixed)" || { echo "slurm did not come up:" >&2; tail -n 20 "$T"/slurmctld.log "$T"/slurmd.log >&2; exit 1; }
sinfo >&2

RUN_DIR="$T/run"
cd "$REPO"
job=$(CONFIG="$CONFIG" RUN_DIR="$RUN_DIR" PLATFORM=cpu DEVICES_PER_PROCESS=${DEVICES_PER_PROCESS:-4} \
  NEOX_JAX="${NEOX_JAX:-neox-jax}" \
  sbatch --parsable --nodes=1 --ntasks-per-node="$NTASKS" --cpus-per-task=1 --gpus-per-node=0 --oversubscribe \
  --output="$T/job-%j.out" launch/slurm.sbatch "$@")
echo "submitted job $job" >&2
while squeue -h -j "$job" 2>/dev/null | grep -q .; do sleep 2; done
echo "----- job $job output" >&2
cat "$T/job-$job.out"
state=$(scontrol show job "$job" 2>/dev/null | grep -o 'JobState=[A-Z]*' || true)
echo "----- $state" >&2
grep -q '"steps"' "$T/job-$job.out"
# the same run in one process with all the devices: the per-step losses must agree
echo "----- the same run in one process x $((NTASKS * ${DEVICES_PER_PROCESS:-4})) devices" >&2
JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$((NTASKS * ${DEVICES_PER_PROCESS:-4}))" \
  ${NEOX_JAX:-neox-jax} -q train "$CONFIG" --run-dir "$T/single" "$@" >/dev/null
python3 - "$RUN_DIR/metrics.jsonl" "$T/single/metrics.jsonl" <<'PY'
import json, math, sys
a, b = ([json.loads(l)["loss"] for l in open(p) if '"loss"' in l] for p in sys.argv[1:])
print(f"losses, {len(a)} steps\n  slurm, several processes: {a}\n  one process:              {b}")
ok = len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-5) for x, y in zip(a, b))
print("AGREE (rel. 1e-5)" if ok else "DIFFER")
sys.exit(0 if ok else 1)
PY

#!/usr/bin/env bash
# scopevid on Slurm (or one machine): a Ray cluster over the allocation, the driver, teardown.
#
#   sbatch [--nodes N --gpus-per-node G --cpus-per-task C ...] launch.sh CONFIG [DRIVER ARGS...]
#   sbatch launch.sh --resume DIR                      # continue a stopped or killed job or batch
#   ./launch.sh --local CONFIG [DRIVER ARGS...]        # one machine, no Slurm
#   (Ray's bundles need a CPU per rank: `sbatch -c 2 launch.sh CONFIG --world-size 2`; sbatch's default is 1)
#
# DRIVER ARGS are those of `python -m scopevid.cluster.driver` (--frames, --world-size, --out, ...);
# without --out (or --resume) the outputs go to runs/<job id>. The Ray head runs on the first node of
# the allocation, one Ray worker node per other node (srun steps); the script waits until every node
# has joined, runs the driver on the head node, and tears the cluster down on any exit.
#
# Environment (all optional):
#   SCOPEVID_ROOT        repository root (default: sbatch's submit dir, or this script's dir)
#   SCOPEVID_PYTHON      python with scopevid installed (default: ROOT/.venv/bin/python, else python3)
#   SCOPEVID_HEAD_IP     address the head binds for the other nodes (default: `hostname --ip-address`;
#                        --local: 127.0.0.1)
#   SCOPEVID_RAY_TMP     Ray's temp dir (default: /tmp/ray-scopevid-<job id>; keep it short)
#   SCOPEVID_JOIN_TIMEOUT seconds to wait for all nodes (default 300)
#   RAY_AUTH_MODE        default here: token, with a fresh random RAY_AUTH_TOKEN per job (exported to
#                        every srun step); set RAY_AUTH_MODE=disabled to opt out (see docs/cluster.md)
#
#SBATCH --job-name=scopevid
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --output=runs/slurm-%j.log
set -euo pipefail

MODE=slurm
if [[ "${1:-}" == "--local" ]]; then
  MODE=local
  shift
fi
if [[ $# -lt 1 || "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
if [[ $MODE == slurm && -z "${SLURM_JOB_ID:-}" ]]; then
  echo "launch.sh: not inside a Slurm allocation; submit with sbatch, or run ./launch.sh --local CONFIG ..." >&2
  exit 2
fi

ARGS=()
if [[ "$1" != -* ]]; then  # the config, positionally
  ARGS+=(--config "$1")
  shift
fi
ARGS+=("$@")

ROOT=${SCOPEVID_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}}
cd "$ROOT"
if [[ -n "${SCOPEVID_PYTHON:-}" ]]; then PY=$SCOPEVID_PYTHON
elif [[ -x "$ROOT/.venv/bin/python" ]]; then PY=$ROOT/.venv/bin/python
else PY=$(command -v python3); fi
RAY=$(dirname "$PY")/ray
[[ -x "$RAY" ]] || RAY=$(command -v ray)
TAG=${SLURM_JOB_ID:-local-$$}
JOIN_TIMEOUT=${SCOPEVID_JOIN_TIMEOUT:-300}

has_out=0
for a in "${ARGS[@]}"; do [[ "$a" == --out || "$a" == --out=* || "$a" == --resume || "$a" == --resume=* ]] && has_out=1; done
[[ $has_out == 1 ]] || ARGS+=(--out "$ROOT/runs/$TAG")

# Ray 2.60 turns token auth on by default. Give this job's cluster a token of its own (environment
# only: nothing is written to ~/.ray), unless the caller chose a mode.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
if [[ $RAY_AUTH_MODE == token && -z "${RAY_AUTH_TOKEN:-}" && -z "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
  RAY_AUTH_TOKEN=$("$PY" -c 'import secrets; print(secrets.token_hex(32))')
  export RAY_AUTH_TOKEN
fi
export RAY_USAGE_STATS_ENABLED=0
unset RAY_ADDRESS

if [[ $MODE == local ]]; then
  HEAD_IP=${SCOPEVID_HEAD_IP:-127.0.0.1}
  NODES=(localhost)
  # the machine's CPUs (nproc would count OMP_NUM_THREADS, often 1 in a training shell)
  CPUS=${SCOPEVID_CPUS:-$("$PY" -c 'import os; print(len(os.sched_getaffinity(0)))')}
else
  mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  HEAD_IP=${SCOPEVID_HEAD_IP:-$(hostname --ip-address | awk '{print $1}')}
  CPUS=${SCOPEVID_CPUS:-${SLURM_CPUS_ON_NODE:-$(nproc)}}
fi
NNODES=${#NODES[@]}
RAY_TMP=${SCOPEVID_RAY_TMP:-/tmp/ray-scopevid-$TAG}
OWN_TMP=0
[[ -z "${SCOPEVID_RAY_TMP:-}" && ! -e "$RAY_TMP" ]] && OWN_TMP=1
mkdir -p "$RAY_TMP"
# every port of the head chosen free on this (the head) node: jobs sharing a node never collide
read -r PORT DASH AGENT AGENT_GRPC RTENV METRICS OBJMGR NODEMGR CLIENT < <("$PY" -m scopevid.cluster.raycluster ports 9)
ADDRESS=$HEAD_IP:$PORT

HEAD_PID=""
WORKERS_PID=""
DRIVER_PID=""
stop_pid() {  # TERM, wait up to $2 seconds (default 10), KILL
  local pid=$1 secs=${2:-10} i
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 $((secs * 5))); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
  kill -KILL "$pid" 2>/dev/null || true
}
teardown() {
  local rc=$?
  trap - EXIT INT TERM
  echo "launch.sh: tearing down the Ray cluster" >&2
  # the driver stops its ranks, records the job and prints its one line (Slurm does not always signal
  # it, so we do; a second SIGTERM is ignored by it); SIGKILL if it is not done in 10 s
  stop_pid "$DRIVER_PID"
  # then the Ray nodes: everything worth keeping is written by now, and `ray start --block` can take
  # tens of seconds to stop busy workers (scancel would leave the job completing that long): this job's
  # Ray processes on this node (they name its private temp dir) and their workers are killed outright
  "$PY" -m scopevid.cluster.raycluster kill "$RAY_TMP" 2>/dev/null || true
  stop_pid "$WORKERS_PID" 1
  stop_pid "$HEAD_PID" 1
  if [[ $MODE == local && -n "$HEAD_PID" ]]; then  # leftovers of our own session only
    for p in $(ps -eo pid=,sid= | awk -v s="$HEAD_PID" '$2 == s {print $1}'); do kill -KILL "$p" 2>/dev/null || true; done
  fi
  wait 2>/dev/null || true
  # the head's Ray logs stay for a failed job; a successful one leaves nothing behind in /tmp
  [[ $rc == 0 && $OWN_TMP == 1 ]] && rm -rf "$RAY_TMP"
  exit $rc
}
trap teardown EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

HEAD_ARGS=(start --head --block --node-ip-address="$HEAD_IP" --port="$PORT" --num-cpus="$CPUS"
  --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$DASH"
  --dashboard-agent-listen-port="$AGENT" --dashboard-agent-grpc-port="$AGENT_GRPC"
  --runtime-env-agent-port="$RTENV" --metrics-export-port="$METRICS" --object-manager-port="$OBJMGR"
  --node-manager-port="$NODEMGR" --ray-client-server-port="$CLIENT" --temp-dir="$RAY_TMP" --disable-usage-stats)
[[ -n "${SCOPEVID_OBJECT_STORE_BYTES:-}" ]] && HEAD_ARGS+=(--object-store-memory="$SCOPEVID_OBJECT_STORE_BYTES")

echo "launch.sh: $MODE, $NNODES node(s) [${NODES[*]}], head $ADDRESS, $CPUS CPU(s) per node, auth $RAY_AUTH_MODE" >&2
if [[ $MODE == local ]]; then
  setsid "$RAY" "${HEAD_ARGS[@]}" > "$RAY_TMP/head.log" 2>&1 &
  HEAD_PID=$!
else
  srun --nodes=1 --ntasks=1 --overlap -w "${NODES[0]}" "$RAY" "${HEAD_ARGS[@]}" > "$RAY_TMP/head.log" 2>&1 &
  HEAD_PID=$!
  if (( NNODES > 1 )); then
    # one Ray worker node per other node; each counts its own CPUs (and sees its GPUs via Slurm)
    # (every port chosen free on its node; its own temp dir, so nodes sharing a machine never collide)
    srun --nodes=$((NNODES - 1)) --ntasks=$((NNODES - 1)) --ntasks-per-node=1 --overlap --exclude="${NODES[0]}" \
      bash -c "exec \"$PY\" -m scopevid.cluster.raycluster worker $ADDRESS --num-cpus=\${SLURM_CPUS_ON_NODE:-$CPUS} \
               --temp-dir=$RAY_TMP-\$SLURM_NODEID" \
      > "$RAY_TMP/workers.log" 2>&1 &
    WORKERS_PID=$!
  fi
fi

if ! "$PY" -m scopevid.cluster.raycluster wait "$ADDRESS" --nodes "$NNODES" --timeout "$JOIN_TIMEOUT"; then
  echo "launch.sh: the Ray cluster did not come up; head log:" >&2
  tail -n 30 "$RAY_TMP/head.log" >&2 || true
  [[ -f "$RAY_TMP/workers.log" ]] && tail -n 30 "$RAY_TMP/workers.log" >&2
  exit 1
fi

# in the background + wait, so a TERM/INT to this script is handled at once (teardown stops the driver)
set +e
# --stop-grace 0.5: after scancel the ranks get half a second to close their outputs (the MP4 and the run log
# are readable without it), so the job leaves squeue within seconds
"$PY" -m scopevid.cluster.driver --address "$ADDRESS" --stop-grace 0.5 "${ARGS[@]}" &
DRIVER_PID=$!
wait "$DRIVER_PID"
rc=$?
DRIVER_PID=""
set -e
exit $rc

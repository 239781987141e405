#!/usr/bin/env bash
# Train pathor1_jax on GPUs: one host with N GPUs, or several hosts (run this once per host).
#
#   launch/gpu.sh --config configs/X.py [--gpus N] [--install] [--dry-run] [-- EXTRA TRAIN ARGS]
#
# One process per host drives all of that host's GPUs. Multi-node runs read the cluster from the
# environment (set by you or your scheduler) and pass it to jax.distributed.initialize():
#   COORDINATOR_ADDRESS  host:port of process 0 (or MASTER_ADDR + MASTER_PORT, port default 1234)
#   NUM_PROCESSES        number of hosts         (or NNODES / WORLD_SIZE)
#   PROCESS_ID           this host's rank, 0-based (or NODE_RANK / RANK)
# --gpus N restricts the run to GPUs 0..N-1 (CUDA_VISIBLE_DEVICES); --install installs this
# checkout with jax[cuda12] first. --dry-run prints the exact commands instead of running them.
# Exit status: that of `pathor1 train`; 143 = preempted (SIGTERM) after saving a checkpoint: rerun
# the same command to resume (a scheduler should requeue the job on 143, e.g. SLURM's --requeue).
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit "${1:-0}"; }

CONFIG="" GPUS="" INSTALL=0 DRY_RUN=0 EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) CONFIG="$2"; shift 2 ;;
    --gpus) GPUS="$2"; shift 2 ;;
    --install) INSTALL=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "gpu.sh: unknown argument $1" >&2; usage 2 ;;
  esac
done
if [[ -z "$CONFIG" ]]; then echo "gpu.sh: --config is required" >&2; usage 2; fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

COORD="${COORDINATOR_ADDRESS:-}"
if [[ -z "$COORD" && -n "${MASTER_ADDR:-}" ]]; then COORD="$MASTER_ADDR:${MASTER_PORT:-1234}"; fi
NPROCS="${NUM_PROCESSES:-${NNODES:-${WORLD_SIZE:-1}}}"
PID="${PROCESS_ID:-${NODE_RANK:-${RANK:-0}}}"
if [[ "$NPROCS" -gt 1 && -z "$COORD" ]]; then
  echo "gpu.sh: $NPROCS processes but no COORDINATOR_ADDRESS (or MASTER_ADDR) in the environment" >&2; exit 2
fi
if [[ "$PID" -ge "$NPROCS" ]]; then
  echo "gpu.sh: PROCESS_ID $PID must be below NUM_PROCESSES $NPROCS" >&2; exit 2
fi

ENV=()
if [[ -n "$GPUS" ]]; then ENV+=("CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((GPUS - 1)))"); fi
if [[ "$NPROCS" -gt 1 ]]; then
  ENV+=("JAX_COORDINATOR_ADDRESS=$COORD" "JAX_NUM_PROCESSES=$NPROCS" "JAX_PROCESS_ID=$PID")
fi

# shellcheck source=launch/show.sh
source "$(dirname "${BASH_SOURCE[0]}")/show.sh"

run() {
  if [[ "$DRY_RUN" == 1 ]]; then show "$@"; else "$@"; fi
}

cd "$REPO"
if [[ "$INSTALL" == 1 ]]; then
  run python3 -m pip install -q -U 'jax[cuda12]'
  run python3 -m pip install -q -e "$REPO"
fi
TRAIN=(python3 -m pathor1_jax.cli train --config "$CONFIG" "${EXTRA[@]+"${EXTRA[@]}"}")
if [[ ${#ENV[@]} -gt 0 ]]; then TRAIN=(env "${ENV[@]}" "${TRAIN[@]}"); fi
status=0
run "${TRAIN[@]}" || status=$?
if [[ "$status" == 143 ]]; then
  echo "gpu.sh: preempted; the checkpoint is saved: rerun the same command to resume" >&2
fi
exit "$status"

#!/usr/bin/env bash
# Train pathor1_jax on GPU hosts under SLURM: one task per node, `srun` starts them all.
#
#   launch/slurm.sh --config configs/X.py --nodes N [--gpus-per-node G] [--partition P] [--time T] \
#       [--account A] [--dry-run] [-- EXTRA TRAIN ARGS]
#
# Submits (sbatch) a batch script that runs `srun python3 -m pathor1_jax.cli train --config X` with
# one task per node; JAX reads the cluster from SLURM's variables (jax.distributed.initialize()
# detects SLURM). The job is requeued when the run exits 143 (preempted after saving a
# checkpoint: SIGTERM from SLURM's preemption or --time limit), so it resumes by itself; SLURM
# sends SIGTERM 120 s before the time limit (--signal). Run it from the root of this checkout on
# the cluster's login node, in an environment where pathor1_jax is installed.
# --dry-run prints the batch script and the sbatch command instead of submitting.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit "${1:-0}"; }

CONFIG="" NODES="" GPUS=8 PARTITION="" TIME="" ACCOUNT="" DRY_RUN=0 EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) CONFIG="$2"; shift 2 ;;
    --nodes) NODES="$2"; shift 2 ;;
    --gpus-per-node) GPUS="$2"; shift 2 ;;
    --partition) PARTITION="$2"; shift 2 ;;
    --time) TIME="$2"; shift 2 ;;
    --account) ACCOUNT="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "slurm.sh: unknown argument $1" >&2; usage 2 ;;
  esac
done
if [[ -z "$CONFIG" || -z "$NODES" ]]; then echo "slurm.sh: --config and --nodes are required" >&2; usage 2; fi
if ! [[ "$NODES" =~ ^[1-9][0-9]*$ ]]; then echo "slurm.sh: --nodes must be a positive integer" >&2; exit 2; fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# shellcheck source=launch/show.sh
source "$(dirname "${BASH_SOURCE[0]}")/show.sh"

SBATCH=(sbatch --job-name=pathor1 --nodes="$NODES" --ntasks-per-node=1 --gpus-per-node="$GPUS"
        --requeue --signal=TERM@120 --open-mode=append --output=pathor1-%j.log)
[[ -n "$PARTITION" ]] && SBATCH+=(--partition="$PARTITION")
[[ -n "$TIME" ]] && SBATCH+=(--time="$TIME")
[[ -n "$ACCOUNT" ]] && SBATCH+=(--account="$ACCOUNT")

SCRIPT="#!/usr/bin/env bash
cd $(show "$REPO")
status=0
srun $(show python3 -m pathor1_jax.cli train --config "$CONFIG" "${EXTRA[@]+"${EXTRA[@]}"}") || status=\$?
if [[ \"\$status\" == 143 ]]; then
  echo \"preempted: checkpoint saved; requeueing job \$SLURM_JOB_ID to resume\" >&2
  scontrol requeue \"\$SLURM_JOB_ID\"
fi
exit \"\$status\""

if [[ "$DRY_RUN" == 1 ]]; then
  show "${SBATCH[@]}"
  echo "$SCRIPT"
else
  "${SBATCH[@]}" <<< "$SCRIPT"
fi

#!/usr/bin/env bash
# Train pathor1_jax on a Cloud TPU VM (a single host or a multi-host pod slice), or on several
# slices joined over the data-center network (Multislice).
#
#   launch/tpu_pod.sh --tpu NAME --zone ZONE [--project PROJECT] --config configs/X.py \
#       [--slices N] [--no-install] [--log FILE] [--dry-run] [-- EXTRA TRAIN ARGS]
#
# 1. packs this checkout (git archive HEAD) and copies it to every worker,
# 2. installs it with jax[tpu] on every worker,
# 3. starts `pathor1 train --config X` on all workers at once (one process per host; each calls
#    jax.distributed.initialize(), process 0 writes logs and metrics),
# 4. streams worker 0's log here (Ctrl-C stops the streaming, not the training).
# --slices N: the N slices of a multislice queued resource, named NAME-0 ... NAME-(N-1) (its node
# prefix); every step runs on the workers of each slice. The config's mesh must span the slices
# (e.g. config.mesh.dcn = dict(data=N)).
# --dry-run prints the exact commands instead of running them.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit "${1:-0}"; }

TPU="" ZONE="" PROJECT="" CONFIG="" SLICES=1 INSTALL=1 DRY_RUN=0 LOG='~/pathor1_train.log' EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) TPU="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --config) CONFIG="$2"; shift 2 ;;
    --slices) SLICES="$2"; shift 2 ;;
    --log) LOG="$2"; shift 2 ;;
    --no-install) INSTALL=0; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "tpu_pod.sh: unknown argument $1" >&2; usage 2 ;;
  esac
done
for required in TPU ZONE CONFIG; do
  if [[ -z "${!required}" ]]; then
    echo "tpu_pod.sh: --$(tr '[:upper:]' '[:lower:]' <<< "$required") is required" >&2; usage 2
  fi
done

if ! [[ "$SLICES" =~ ^[1-9][0-9]*$ ]]; then echo "tpu_pod.sh: --slices must be a positive integer" >&2; exit 2; fi
NODES=("$TPU")
if [[ "$SLICES" -gt 1 ]]; then NODES=(); for ((i = 0; i < SLICES; i++)); do NODES+=("$TPU-$i"); done; fi

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ ! -f "$REPO/$CONFIG" ]]; then
  echo "tpu_pod.sh: --config $CONFIG must be a path inside the checkout (it runs from there on the workers)" >&2
  exit 2
fi
TARBALL="/tmp/pathor1_jax-src.tar.gz"
REMOTE_DIR='~/pathor1_jax'
GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && WHERE+=(--project="$PROJECT")

# shellcheck source=launch/show.sh
source "$(dirname "${BASH_SOURCE[0]}")/show.sh"

run() {
  if [[ "$DRY_RUN" == 1 ]]; then show "$@"; else "$@"; fi
}

TRAIN="$(show python3 -m pathor1_jax.cli train --config "$CONFIG" "${EXTRA[@]+"${EXTRA[@]}"}")"

if [[ "$INSTALL" == 1 ]]; then
  run git -C "$REPO" archive --format=tar.gz -o "$TARBALL" HEAD
  for node in "${NODES[@]}"; do
    run "${GCLOUD[@]}" scp "$TARBALL" "$node:~/pathor1_jax-src.tar.gz" --worker=all "${WHERE[@]}"
    run "${GCLOUD[@]}" ssh "$node" --worker=all "${WHERE[@]}" --command \
      "mkdir -p $REMOTE_DIR && tar -xzf ~/pathor1_jax-src.tar.gz -C $REMOTE_DIR && python3 -m pip install -q -U 'jax[tpu]' && python3 -m pip install -q -e $REMOTE_DIR"
  done
fi
for node in "${NODES[@]}"; do
  run "${GCLOUD[@]}" ssh "$node" --worker=all "${WHERE[@]}" --command \
    "cd $REMOTE_DIR && PATHOR1_MULTIHOST=1 setsid nohup $TRAIN > $LOG 2>&1 < /dev/null &"
done
run "${GCLOUD[@]}" ssh "${NODES[0]}" --worker=0 "${WHERE[@]}" --command "tail -n +1 -F $LOG"

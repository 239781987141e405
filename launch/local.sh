#!/usr/bin/env bash
# A multi-host job on this machine: N processes, each with D fake CPU devices, joined by
# jax.distributed (coordinator on 127.0.0.1) and gloo collectives.
#
#   launch/local.sh N_PROCESSES DEVICES_PER_PROCESS [--timeout S] [--grace S] [--port P] \
#       [--heartbeat-timeout S] -- COMMAND ...
#
# e.g. launch/local.sh 2 2 -- pathor1 train --config configs/demo_sft.py
# Output lines are prefixed [p0], [p1], ...; the first process to fail stops the others (SIGTERM,
# then SIGKILL after --grace) and its exit code is the job's; --timeout bounds the job (exit 124).
# Runs `python3 -m pathor1_jax.launch.local` (the installed package; $PYTHON picks the interpreter).
set -euo pipefail
exec "${PYTHON:-python3}" -m pathor1_jax.launch.local "$@"

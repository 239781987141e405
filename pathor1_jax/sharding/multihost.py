"""Multi-process (multi-host) start-up, process-0-only side effects, and per-process batches.

One process runs per host (TPU VM worker, GPU node). Every process builds the same global mesh;
each feeds only its own rows of the global batch, and only process 0 writes logs and metrics.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pathor1_jax.logical import Rules, logical_to_spec

# Environment variables set by launch/gpu.sh (and usable by hand) for an explicit cluster.
COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"
# Set by launch/tpu_pod.sh: JAX finds the other TPU workers itself.
MULTIHOST_ENV = "PATHOR1_MULTIHOST"


def multi_process_env(env: Mapping[str, str] | None = None) -> dict[str, object] | None:
    """Arguments for `jax.distributed.initialize` when `env` describes several processes, else None.

    Explicit `JAX_COORDINATOR_ADDRESS` / `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID` win; otherwise
    `PATHOR1_MULTIHOST=1` (launch/tpu_pod.sh), a multi-worker Cloud TPU VM (`TPU_WORKER_HOSTNAMES`
    lists several hosts), SLURM or Open MPI with more than one task let JAX detect the cluster
    itself (empty arguments).
    """
    env = os.environ if env is None else env
    if env.get(COORDINATOR_ENV):
        missing = [k for k in (NUM_PROCESSES_ENV, PROCESS_ID_ENV) if not env.get(k)]
        if missing:
            raise ValueError(f"{COORDINATOR_ENV} is set but {', '.join(missing)} is not")
        if int(env[NUM_PROCESSES_ENV]) <= 1:
            return None
        return {
            "coordinator_address": env[COORDINATOR_ENV],
            "num_processes": int(env[NUM_PROCESSES_ENV]),
            "process_id": int(env[PROCESS_ID_ENV]),
        }
    if env.get(MULTIHOST_ENV) == "1":
        return {}
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]) > 1:
        return {}
    if int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return {}
    return None


def maybe_initialize_distributed(env: Mapping[str, str] | None = None) -> bool:
    """Call `jax.distributed.initialize` once when running multi-process; True if it is (now) on.

    Call it first, before anything touches `jax.devices()`.
    """
    if jax.distributed.is_initialized():
        return True
    kwargs = multi_process_env(env)
    if kwargs is None:
        return False
    jax.distributed.initialize(**kwargs)
    return True


def is_main_process() -> bool:
    """True on process 0, the only one that writes logs, metrics and checkpoints' metadata."""
    return jax.process_index() == 0


def batch_spec(rules: Rules) -> PartitionSpec:
    """How the rules lay out the leading (batch) dimension of input arrays."""
    return logical_to_spec(("batch",), rules)


def make_global_batch(local_batch, mesh: Mesh, spec: PartitionSpec):
    """Global arrays from this process's rows of the batch (a pytree of host arrays).

    Each process passes `global_batch_size / process_count` rows; the leading dimension of the
    result is the global batch, laid out by `spec` (e.g. `batch_spec(rules)`).
    """
    sharding = NamedSharding(mesh, spec)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
    )

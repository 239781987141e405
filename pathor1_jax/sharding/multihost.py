"""Multi-process (multi-host) start-up, process-0-only side effects, and per-process batches.

One process runs per host (TPU VM worker, GPU node). Every process builds the same global mesh;
each feeds only its own rows of the global batch, and only process 0 writes logs and metrics.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pathor1_jax.errors import Pathor1Error
from pathor1_jax.logical import Rules, batch_parts, current_rules, logical_to_spec
from pathor1_jax.sharding.env import (
    COORDINATOR_ENV,
    HEARTBEAT_ENV,
    MULTIHOST_ENV,
    NUM_PROCESSES_ENV,
    PROCESS_ID_ENV,
)


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
    env = os.environ if env is None else env
    kwargs = multi_process_env(env)
    if kwargs is None:
        return False
    if env.get(HEARTBEAT_ENV):
        kwargs["heartbeat_timeout_seconds"] = int(env[HEARTBEAT_ENV])
    # Cross-process collectives of CPU devices (a local multi-process run) go over gloo (TCP).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
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


def batch_block(mesh: Mesh, rules: Rules) -> tuple[int, int]:
    """`(index, count)`: this process's block of the batch dimension and how many such blocks the
    processes split it into (`(process_index, process_count)` on the usual meshes whose batch axes
    span every device; fewer blocks when processes hold the same rows, e.g. `tensor` across hosts).
    The rows of block i are the i-th `1/count` of every global batch."""
    spec = batch_spec(rules)
    num_parts = batch_parts(mesh, rules)
    indices = NamedSharding(mesh, PartitionSpec(spec[0])).addressable_devices_indices_map((num_parts,))
    starts = sorted({idx[0].indices(num_parts)[0] for idx in indices.values()})
    size = len(starts)
    if starts != list(range(starts[0], starts[0] + size)) or num_parts % size or starts[0] % size:
        raise ValueError(
            f"process {jax.process_index()} holds batch parts {starts} of {num_parts}: not one contiguous "
            "block; order the mesh so that each process holds consecutive rows of the batch"
        )
    return starts[0] // size, num_parts // size


def local_rows(num_rows: int) -> tuple[slice, int, int]:
    """`(rows, block, blocks)`: this process's rows of a global batch of `num_rows` rows, i.e. those of
    its block (`batch_block`) on the mesh of the current `use_rules` context (all rows outside one)."""
    ctx = current_rules()
    if ctx is None:
        return slice(0, num_rows), 0, 1
    index, count = batch_block(*ctx)
    if num_rows % count:
        raise ValueError(f"a batch of {num_rows} rows does not split over {count} processes")
    per = num_rows // count
    return slice(index * per, (index + 1) * per), index, count


def local_batch_devices(mesh: Mesh, rules: Rules) -> int:
    """How many parts of the batch axes this process's devices hold (its rows split over them)."""
    return batch_parts(mesh, rules) // batch_block(mesh, rules)[1]


def to_global(local: Any, axis: int = 0) -> Any:
    """This process's block of a batch field (a pytree of host arrays whose `axis` holds its rows, or
    its image patches) → arrays on the current `use_rules` mesh with that axis split over the batch
    axes, the blocks of all processes in order; outside a context, plain device arrays."""
    ctx = current_rules()
    if ctx is None:
        return jax.tree.map(jnp.asarray, local)
    mesh, rules = ctx
    return make_global_batch(local, mesh, PartitionSpec(*([None] * axis), batch_spec(rules)[0]))


def to_host(x: Any) -> np.ndarray:
    """The whole value of an array as numpy on every process (gathered when it spans processes:
    a collective, so every process must call it)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def gather_objects(obj: Any) -> list[Any]:
    """Every process's JSON-serialisable `obj`, in process order (a collective)."""
    if jax.process_count() == 1:
        return [obj]
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int64))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(row[:n])) for row, n in zip(rows, sizes, strict=True)]


def any_process(*flags: bool) -> tuple[bool, ...]:
    """Each flag OR-ed over all processes (a collective: every process calls it with as many flags),
    so that they all take the same decision, e.g. to stop at this step."""
    values = np.asarray(flags, np.int32)
    if jax.process_count() > 1:
        values = np.asarray(multihost_utils.process_allgather(values)).max(axis=0)
    return tuple(bool(v) for v in values)


class PeerFailure(Pathor1Error):
    """Another process of a multi-process run died or cannot be reached: this one cannot go on. The
    command line exits at once after saying so (`exit_now`): JAX's own clean-up at exit would wait
    for the lost process, then abort."""

    exit_now = True


# Runtime errors that mean a collective or the coordination service lost another process.
_PEER_ERRORS = ("Gloo", "Connection reset", "Connection closed", "heartbeat", "UNAVAILABLE", "Barrier")


@contextlib.contextmanager
def peer_failures(hint: str) -> Iterator[None]:
    """Within this block, a runtime error caused by a lost process (multi-process runs only) becomes
    a `PeerFailure` saying so, followed by `hint` (what survives, how to resume)."""
    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        text = str(e)
        if jax.process_count() == 1 or not any(marker in text for marker in _PEER_ERRORS):
            raise
        first = text.strip().splitlines()[0][:300]
        raise PeerFailure(
            f"process {jax.process_index()}: lost contact with another process ({first}); {hint}"
        ) from e

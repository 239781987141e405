"""Which platform traced code is compiled for: the mesh in context, not the host.

Kernels choose their implementation (`impl="auto"`) by the devices the computation will run on.
Compiling ahead of time for a TPU topology from a CPU host (`jax.experimental.topologies`) puts TPU
devices in the mesh while `jax.default_backend()` still says "cpu", so the mesh is asked first:

1. the abstract mesh JAX tracks (`jax.set_mesh(mesh)`, `jax.sharding.use_abstract_mesh`, and inside
   `shard_map`): its `abstract_device.platform`;
2. the mesh of `logical.use_rules(mesh, rules)`: its devices' platform;
3. otherwise `jax.default_backend()`.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import jax
from jax.sharding import AbstractMesh, Mesh

from pathor1_jax import logical

PLATFORMS = ("cpu", "gpu", "tpu")
_ALIASES = {"cuda": "gpu", "rocm": "gpu"}


def _normalise(platform: str) -> str:
    return _ALIASES.get(platform, platform)


def mesh_platform(mesh: Mesh | AbstractMesh) -> str | None:
    """The platform of `mesh`'s devices ("cpu", "gpu", "tpu"), or None for a device-free mesh."""
    if isinstance(mesh, AbstractMesh):
        device = mesh.abstract_device
        return None if device is None else _normalise(device.platform)
    if mesh.devices.size == 0:
        return None
    return _normalise(mesh.devices.flat[0].platform)


def target_platform() -> str:
    """ "cpu", "gpu" or "tpu": what the code being traced now will be compiled for (module doc)."""
    platform = mesh_platform(jax.sharding.get_abstract_mesh())
    if platform is None and (ctx := logical.current_rules()) is not None:
        platform = mesh_platform(ctx[0])
    return platform or _normalise(jax.default_backend())


def _mesh_device_kind(mesh: Mesh | AbstractMesh) -> str | None:
    if isinstance(mesh, AbstractMesh):
        return None if mesh.abstract_device is None else mesh.abstract_device.device_kind
    return None if mesh.devices.size == 0 else mesh.devices.flat[0].device_kind


def target_device_kind() -> str:
    """The device kind ("TPU v5 lite", "TPU v6 lite", ...) of the devices `target_platform()`
    names, asked in the same order (kernels pick per-chip tiles by it)."""
    kind = _mesh_device_kind(jax.sharding.get_abstract_mesh())
    if kind is None and (ctx := logical.current_rules()) is not None:
        kind = _mesh_device_kind(ctx[0])
    return kind or jax.devices()[0].device_kind


_IMPLS: contextvars.ContextVar[dict[str, set[str]] | None] = contextvars.ContextVar(
    "pathor1_kernel_impls", default=None
)


@contextlib.contextmanager
def recording_impls() -> Iterator[dict[str, set[str]]]:
    """Within this context, kernels record the implementation they trace (`note_impl`): yields
    `{op: {impl, ...}}`, e.g. `{"attention": {"pallas_tpu", "xla"}}` (what `pathor1 compile` shows)."""
    impls: dict[str, set[str]] = {}
    token = _IMPLS.set(impls)
    try:
        yield impls
    finally:
        _IMPLS.reset(token)


def note_impl(op: str, impl: str) -> None:
    """Record that `op` ("attention", "policy_loss") traced `impl`, inside `recording_impls`."""
    impls = _IMPLS.get()
    if impls is not None:
        impls.setdefault(op, set()).add(impl)

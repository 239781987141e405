"""Logical axis names → mesh axes, for parameters and activations.

Models name dimensions with logical axes (`"batch"`, `"embed"`, `"heads"`, ...). Outside a
`use_rules(mesh, rules)` context `constrain` is the identity, so the same model code runs on one
device, a fake 8-device CPU mesh, a GPU box or a TPU pod.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

_CONTEXT: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "pathor1_sharding_rules", default=None
)


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Within this context, `constrain` maps logical axes to `mesh` axes with `rules`."""
    token = _CONTEXT.set((mesh, tuple(rules)))
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def current_rules() -> tuple[Mesh, Rules] | None:
    """The `(mesh, rules)` of the innermost `use_rules` context, or None outside one."""
    return _CONTEXT.get()


def logical_to_spec(axes: Sequence[str | None], rules: Rules) -> PartitionSpec:
    """First matching rule wins; a mesh axis is used at most once per array."""
    used: set[str] = set()
    spec = []
    for name in axes:
        target = None
        for logical, mesh_axes in rules:
            if logical != name or mesh_axes is None:
                continue
            candidate = axis_names(mesh_axes)
            if not used.intersection(candidate):
                target = candidate
                break
        if target is None:
            spec.append(None)
        else:
            used.update(target)
            spec.append(target[0] if len(target) == 1 else target)
    return PartitionSpec(*spec)


def axis_names(entry: str | Sequence[str] | None) -> tuple[str, ...]:
    """The mesh axes of one entry of a PartitionSpec or rule (None, a name or a tuple of names)."""
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def batch_parts(mesh: Mesh, rules: Rules) -> int:
    """How many ways the rules split the batch dimension on `mesh`."""
    return math.prod(mesh.shape[a] for a in axis_names(logical_to_spec(("batch",), rules)[0]))


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` on logical axes; identity outside `use_rules`."""
    ctx = current_rules()
    if ctx is None:
        return x
    mesh, rules = ctx
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, rules)))

"""Per-device memory of a layout, from abstract shapes only: parameters and optimizer state.

The optimizer state is the run's own: `tx.init` traced abstractly (`jax.eval_shape`) and laid out
by `params.optimizer_shardings`, the function the trainer creates it with, so the estimate is what
the trainer allocates (AdamW: two moments in the parameters' dtype per trainable parameter, none for
frozen ones). Every figure is per device: with evenly divisible shardings (which `rules.spec_for`
enforces) every device holds the same number of bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import AbstractMesh, Mesh

from pathor1_jax.logical import Rules
from pathor1_jax.sharding.params import abstract_params, layouts, optimizer_shardings

GIB = 1024**3


@dataclass(frozen=True)
class MemoryTotals:
    num_params: int
    params_per_device: int  # elements
    param_bytes: int  # bytes per device, in the parameters' dtype
    opt_state_bytes: int  # bytes per device of the optimizer state, as the trainer lays it out

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.opt_state_bytes


def per_device_bytes(tree, shardings) -> int:
    """Bytes one device holds of `tree` (arrays / ShapeDtypeStructs) laid out by `shardings`."""
    return sum(
        math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
        for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True)
    )


def opt_state_bytes(tx: optax.GradientTransformation, state: nnx.State, mesh: Mesh | AbstractMesh,
                    rules: Rules) -> int:  # fmt: skip
    """Per-device bytes of `tx`'s state for the parameters of `state` under `rules`."""
    params = abstract_params(state, mesh, rules)
    opt_state = jax.eval_shape(tx.init, params)
    return per_device_bytes(opt_state, optimizer_shardings(opt_state, params, mesh))


def totals(
    state: nnx.State, mesh: Mesh | AbstractMesh, rules: Rules, tx: optax.GradientTransformation
) -> MemoryTotals:
    mesh_shape = dict(mesh.shape)
    params = [r for r in layouts(state, mesh, rules) if r.is_param]
    return MemoryTotals(
        num_params=sum(r.size for r in params),
        params_per_device=sum(r.shard_size(mesh_shape) for r in params),
        param_bytes=sum(r.shard_size(mesh_shape) * r.dtype.itemsize for r in params),
        opt_state_bytes=opt_state_bytes(tx, state, mesh, rules),
    )


def _natural(path: str) -> tuple:
    """`layers.2` before `layers.10`."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.split("."))


def _fmt_axes(axes) -> str:
    return "-" if axes is None else "(" + ", ".join(str(a) for a in axes) + ")"


def _fmt_bytes(n: int) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _fmt_row(row: tuple[str, ...], widths: list[int]) -> str:
    """Left-aligned text columns, the last (a number) right-aligned."""
    cells = [c.ljust(w) for c, w in zip(row[:-1], widths[:-1], strict=True)]
    return "  ".join([*cells, row[-1].rjust(widths[-1])])


def layout_table(
    state: nnx.State, mesh: Mesh | AbstractMesh, rules: Rules, tx: optax.GradientTransformation
) -> tuple[str, MemoryTotals]:
    """A text table (one row per parameter) and the per-device totals with `tx`'s state."""
    mesh_shape = dict(mesh.shape)
    rows = sorted((r for r in layouts(state, mesh, rules) if r.is_param), key=lambda r: _natural(r.path))
    header = ("parameter", "shape", "dtype", "logical axes", "PartitionSpec", "bytes/device")
    body = [
        (
            r.path,
            "x".join(map(str, r.shape)),
            r.dtype.name,
            _fmt_axes(r.axes),
            str(tuple(r.spec)) if len(r.spec) else "()",
            str(r.shard_size(mesh_shape) * r.dtype.itemsize),
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = [_fmt_row(row, widths) for row in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    t = totals(state, mesh, rules, tx)
    mesh_text = ", ".join(f"{k}={v}" for k, v in mesh_shape.items())
    summary = [
        "",
        f"mesh: {mesh_text} ({int(np.prod(list(mesh_shape.values())))} devices)",
        f"parameters: {t.num_params:,} ({t.params_per_device:,} per device)",
        f"per device: params {t.param_bytes:,} B ({_fmt_bytes(t.param_bytes)})",
        f"per device: optimizer state {t.opt_state_bytes:,} B ({_fmt_bytes(t.opt_state_bytes)})",
        f"per device: total params + optimizer state {t.total_bytes:,} B ({_fmt_bytes(t.total_bytes)})",
    ]
    return "\n".join(lines + summary), t

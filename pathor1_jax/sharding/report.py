"""Per-device memory of a layout, from abstract shapes only: parameters and AdamW state.

AdamW keeps two float32 moments per trainable parameter; when parameters are stored in a lower
precision (bfloat16) a float32 master copy is kept as well. Frozen parameters (the training
config's `freeze` regexes, matched with `re.search` on the dotted path) carry no optimizer state.
Every figure is per device: with evenly divisible shardings (which `rules.spec_for` enforces)
every device holds the same number of bytes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, Mesh

from pathor1_jax.sharding.logical import Rules
from pathor1_jax.sharding.params import ParamLayout, layouts

GIB = 1024**3


@dataclass(frozen=True)
class MemoryTotals:
    num_params: int
    params_per_device: int  # elements
    trainable_per_device: int  # elements with optimizer state
    param_bytes: int  # bytes per device, in the parameters' dtype
    moment_bytes: int  # AdamW mu + nu, float32
    master_bytes: int  # float32 master copy (0 when the parameters are float32)

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.moment_bytes + self.master_bytes


def totals(rows: list[ParamLayout], mesh_shape: dict[str, int], freeze: Sequence[str] = ()) -> MemoryTotals:
    params = [r for r in rows if r.is_param]
    patterns = [re.compile(p) for p in freeze]
    trainable = [r for r in params if not any(p.search(r.path) for p in patterns)]
    trainable_per_device = sum(r.shard_size(mesh_shape) for r in trainable)
    return MemoryTotals(
        num_params=sum(r.size for r in params),
        params_per_device=sum(r.shard_size(mesh_shape) for r in params),
        trainable_per_device=trainable_per_device,
        param_bytes=sum(r.shard_size(mesh_shape) * r.dtype.itemsize for r in params),
        moment_bytes=2 * 4 * trainable_per_device,
        master_bytes=sum(r.shard_size(mesh_shape) * 4 for r in trainable if r.dtype != np.float32),
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
    state: nnx.State, mesh: Mesh | AbstractMesh, rules: Rules, freeze: Sequence[str] = ()
) -> tuple[str, MemoryTotals]:
    """A text table (one row per parameter) and the per-device totals."""
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
    t = totals(rows, mesh_shape, freeze)
    frozen = f" (frozen: {', '.join(freeze)})" if freeze else ""
    mesh_text = ", ".join(f"{k}={v}" for k, v in mesh_shape.items())
    summary = [
        "",
        f"mesh: {mesh_text} ({int(np.prod(list(mesh_shape.values())))} devices)",
        f"parameters: {t.num_params:,} ({t.params_per_device:,} per device)",
        f"trainable per device: {t.trainable_per_device:,}" + frozen,
        f"per device: params {t.param_bytes:,} B ({_fmt_bytes(t.param_bytes)})",
        f"per device: AdamW moments (2 x float32) {t.moment_bytes:,} B ({_fmt_bytes(t.moment_bytes)})",
        f"per device: float32 master copy {t.master_bytes:,} B ({_fmt_bytes(t.master_bytes)})",
        f"per device: total params + optimizer state {t.total_bytes:,} B ({_fmt_bytes(t.total_bytes)})",
    ]
    return "\n".join(lines + summary), t

"""One device mesh with axes `data`, `fsdp`, `tensor`, built from a config block.

    mesh = ConfigDict(dict(data=1, fsdp=-1, tensor=1))            # one slice / one host
    mesh = ConfigDict(dict(data=1, fsdp=-1, tensor=1,
                           dcn=dict(data=2, fsdp=1, tensor=1)))   # 2 slices, data parallel across

Sizes are within a slice (ICI); `dcn` sizes are across slices (or hosts) and multiply them, so the
`data` axis above spans 2 slices. One `-1` fills the devices left over. Every axis is
`AxisType.Auto` so `with_sharding_constraint` works inside `jit`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AbstractMesh, AxisType, Mesh

from pathor1_jax.errors import ConfigError

AXES: tuple[str, ...] = ("data", "fsdp", "tensor")


def _sizes(block: Mapping[str, int], n: int, where: str) -> tuple[int, ...]:
    """Axis sizes in `AXES` order with one `-1` resolved so that they multiply to `n`."""
    unknown = sorted(set(block) - set(AXES))
    if unknown:
        raise ConfigError(f"{where}: unknown mesh axis {unknown}; mesh axes are {list(AXES)}")
    sizes = [int(block.get(a, 1)) for a in AXES]
    shown = dict(zip(AXES, sizes, strict=True))
    if any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"{where}: axis sizes must be positive or -1, got {shown}")
    if sizes.count(-1) > 1:
        raise ConfigError(f"{where}: at most one axis may be -1, got {shown}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n % known:
            raise ConfigError(f"{where}: {shown} cannot fill {n} devices ({n} is not a multiple of {known})")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise ConfigError(
            f"{where}: axis sizes {dict(zip(AXES, sizes, strict=True))} multiply to {math.prod(sizes)}, "
            f"but there are {n} devices"
        )
    return tuple(sizes)


def mesh_shape(config: Mapping, num_devices: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """`(ici_sizes, dcn_sizes)` in `AXES` order for `num_devices` devices in total."""
    config = dict(config)
    dcn_block = dict(config.pop("dcn", None) or {})
    if any(int(v) == -1 for v in dcn_block.values()):
        raise ConfigError("mesh.dcn: sizes across slices must be given explicitly (no -1)")
    dcn = _sizes(dcn_block, math.prod(int(dcn_block.get(a, 1)) for a in AXES), "mesh.dcn")
    slices = math.prod(dcn)
    if num_devices % slices:
        raise ConfigError(f"mesh.dcn: {slices} slices do not divide {num_devices} devices")
    ici = _sizes(config, num_devices // slices, "mesh")
    return ici, dcn


def parse_mesh_arg(text: str) -> dict:
    """`"data=2,fsdp=4,tensor=1"` → `{"data": 2, "fsdp": 4, "tensor": 1}` (for the CLI);
    `dcn.data=2` sets an across-slice size."""
    out: dict = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--mesh: expected axis=size, got {item!r}")
        name = name.strip()
        if name.startswith("dcn."):
            out.setdefault("dcn", {})[name[len("dcn.") :]] = int(value)
        else:
            out[name] = int(value)
    return out


def make_mesh(config: Mapping, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `Mesh` over `devices` (default: all) with `Auto` axes `data`, `fsdp`, `tensor`."""
    devices = list(jax.devices() if devices is None else devices)
    ici, dcn = mesh_shape(config, len(devices))
    if math.prod(dcn) > 1:
        # TPU slices are told apart by `slice_index`; GPU hosts by their process
        grid = mesh_utils.create_hybrid_device_mesh(
            ici,
            dcn,
            devices,
            process_is_granule=devices[0].platform != "tpu",
            allow_split_physical_axes=True,
        )
    else:
        try:
            grid = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
        except (NotImplementedError, ValueError, AssertionError):
            grid = np.asarray(devices).reshape(ici)  # CPU / devices without a known topology
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def abstract_mesh(config: Mapping, num_devices: int) -> AbstractMesh:
    """A device-free mesh for `num_devices` hypothetical devices (layout planning, no memory)."""
    ici, dcn = mesh_shape(config, num_devices)
    sizes = tuple(i * d for i, d in zip(ici, dcn, strict=False))
    return AbstractMesh(sizes, AXES, axis_types=(AxisType.Auto,) * len(AXES))

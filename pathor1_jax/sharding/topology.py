"""Cloud TPU slices by name, their chips, and their devices without the hardware.

    topo = parse_topology("v5e-16")           # Cloud TPU accelerator type: 16 v5e chips, 4x4
    topo = parse_topology("v5p:2x4x4")        # or a chip and a shape (here = v5p-64)
    devices = topology_devices(topo)          # abstract TPU devices from libtpu (no TPU needed)
    mesh = make_mesh(config.mesh, devices)    # compile for them: `jax.jit(f).lower(...).compile()`

Accelerator types count chips for v5e / v6e (`v5e-16`: 16 chips, also `v5litepod-16`) and
TensorCores for v4 / v5p (`v5p-64`: 32 chips of 2 cores, run as one "megacore" device each), as
`gcloud compute tpus` does. A name's slice shape is Cloud TPU's default for that size (`v5e-16` →
4x4, `v5p-64` → 2x4x4); other shapes are named explicitly (`v5p:4x4x12`). Each host drives 4 chips
(a 2x2 block: libtpu's default, as on v5e `ct5lp-hightpu-4t`, v5p and v6e `ct6e-standard-4t` VMs),
so a config's per-process batch is per 4 chips. Several slices (`slices`) are joined over DCN.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re

from pathor1_jax.errors import UserError

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation. `hbm_bytes`: what the XLA TPU compiler lets a program use per device (its
    "available HBM" in out-of-memory errors, libtpu 0.0.42); `published_hbm`: the data sheet's."""

    name: str
    device_kind: str  # jax's `device.device_kind`
    libtpu_name: str  # the chip in libtpu topology names ("v5:2x2x1")
    dims: int  # 2D or 3D slices
    cores_per_chip: int  # TensorCores per chip, as counted by accelerator-type names
    max_chips: int  # the largest single slice
    published_hbm: str
    hbm_bytes: int
    peak_bf16_flops: float  # per chip, dense bf16


# Sources (data sheets; peak compute per chip, bf16, and HBM capacity):
#   v4:  https://cloud.google.com/tpu/docs/v4  — 275 TFLOP/s, 32 GiB, 2 TensorCores per chip
#   v5e: https://cloud.google.com/tpu/docs/v5e — 197 TFLOP/s, 16 GB, 1 TensorCore per chip
#   v5p: https://cloud.google.com/tpu/docs/v5p — 459 TFLOP/s, 95 GB, 2 TensorCores per chip
#   v6e: https://cloud.google.com/tpu/docs/v6e — 918 TFLOP/s, 32 GB, 1 TensorCore per chip
# Usable HBM per device: the limit libtpu 0.0.42's compiler reports ("exceeds available HBM
# (15.75G)"), measured here by compiling an oversized program for each chip.
CHIPS: dict[str, Chip] = {
    chip.name: chip
    for chip in (
        Chip("v4", "TPU v4", "v4", 3, 2, 4096, "32 GiB", int(30.75 * GIB), 275e12),
        Chip("v5e", "TPU v5 lite", "v5e", 2, 1, 256, "16 GB", int(15.75 * GIB), 197e12),
        Chip("v5p", "TPU v5", "v5", 3, 2, 8960, "95 GB", int(95.74 * GIB), 459e12),
        Chip("v6e", "TPU v6 lite", "v6e", 2, 1, 256, "32 GB", int(31.25 * GIB), 918e12),
    )
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v5": "v5p", "trillium": "v6e"}
CHIPS_PER_HOST = 4
TOPOLOGY_HELP = (
    "a Cloud TPU accelerator type (v5e-16, v5litepod-16, v5p-64, v6e-256, v4-8) or chip:shape "
    "(v5e:4x4, v5p:2x4x4)"
)


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as written by the user
    chip: Chip
    shape: tuple[int, ...]  # chips along each axis of one slice
    slices: int = 1

    @property
    def chips_per_slice(self) -> int:
        return math.prod(self.shape)

    @property
    def num_devices(self) -> int:
        return self.chips_per_slice * self.slices

    @property
    def num_hosts(self) -> int:
        return self.slices * max(1, self.chips_per_slice // CHIPS_PER_HOST)

    @property
    def libtpu_name(self) -> str:
        return f"{self.chip.libtpu_name}:{'x'.join(map(str, self.shape))}"

    @property
    def accelerator_type(self) -> str:
        return f"{self.chip.name}-{self.chips_per_slice * self.chip.cores_per_chip}"

    def describe(self) -> str:
        slices = f" x {self.slices} slices" if self.slices > 1 else ""
        return (
            f"{self.accelerator_type} ({self.libtpu_name}{slices}): {self.num_devices} {self.chip.name} "
            f"chips, {self.num_hosts} hosts"
        )


def default_shape(chips: int, dims: int) -> tuple[int, ...] | None:
    """Cloud TPU's slice shape for a power-of-two chip count: from 2x2(x1), double the last of the
    smallest dimensions (v5e: 2x4, 4x4, 4x8, ...; v5p: 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ...)."""
    if chips == 1:
        return (1,) * dims
    if chips < 4 or chips & (chips - 1):
        return None
    shape = [2, 2] + [1] * (dims - 2)
    while math.prod(shape) < chips:
        smallest = min(shape)
        last = max(i for i, s in enumerate(shape) if s == smallest)
        shape[last] *= 2
    return tuple(shape)


def _chip(name: str, text: str) -> Chip:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in CHIPS:
        raise UserError(f"--topology {text!r}: unknown TPU {name!r}; expected one of {sorted(CHIPS)}")
    return CHIPS[key]


def parse_topology(text: str, slices: int = 1) -> Topology:
    """`"v5e-16"`, `"v5p-64"`, `"v5e:4x4"`, `"v5p:2x4x4"` → a `Topology`; `UserError` otherwise."""
    if slices < 1:
        raise UserError(f"--slices {slices}: must be >= 1")
    text = text.strip()
    if m := re.fullmatch(r"([a-z0-9]+)-(\d+)", text, re.IGNORECASE):
        chip, count = _chip(m.group(1), text), int(m.group(2))
        if count % chip.cores_per_chip:
            raise UserError(
                f"--topology {text!r}: {chip.name} accelerator types count TensorCores "
                f"({chip.cores_per_chip} per chip); {count} is not a multiple of {chip.cores_per_chip}"
            )
        chips = count // chip.cores_per_chip
        shape = default_shape(chips, chip.dims)
        if shape is None:
            raise UserError(
                f"--topology {text!r}: no default {chip.name} slice of {chips} chips; name its shape, "
                f"e.g. {chip.name}:{'x'.join(['4'] * chip.dims)}"
            )
    elif m := re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)+)", text, re.IGNORECASE):
        chip = _chip(m.group(1), text)
        shape = tuple(int(s) for s in m.group(2).lower().split("x"))
        if len(shape) == 2 and chip.dims == 3:
            shape = (*shape, 1)
        if len(shape) != chip.dims or min(shape) < 1:
            raise UserError(f"--topology {text!r}: a {chip.name} slice has {chip.dims} dimensions")
    else:
        raise UserError(f"--topology {text!r}: expected {TOPOLOGY_HELP}")
    if math.prod(shape) > chip.max_chips:
        raise UserError(
            f"--topology {text!r}: {math.prod(shape)} chips; a {chip.name} slice has at most "
            f"{chip.max_chips} (use --slices for more)"
        )
    return Topology(text, chip, shape, slices)


@functools.cache
def _devices(libtpu_name: str, chip_config: str, slices: int, wrap: tuple[bool, ...]) -> tuple:
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other compiles on this host
    from jax.experimental import topologies

    return tuple(
        topologies.get_topology_desc(
            platform="tpu",
            topology_name=libtpu_name,
            chip_config_name=chip_config,
            chips_per_host_bounds=(2, 2, 1),
            num_slices=slices,
            wrap=wrap,
        ).devices
    )


def topology_devices(topo: Topology) -> list:
    """The abstract devices of `topo` from libtpu (needs `jax[tpu]`; no TPU hardware)."""
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        raise UserError("compiling for a TPU topology needs libtpu: pip install 'jax[tpu]'")
    megacore = topo.chip.cores_per_chip > 1
    # Wrap-around links (torus): v5e/v6e along a full 16-chip side; v4/v5p in whole 4x4x4 cubes.
    if topo.chip.dims == 2:
        wrap = (*(s % 16 == 0 for s in topo.shape), False)
    else:
        wrap = (all(s % 4 == 0 for s in topo.shape),) * 3
    try:
        devices = _devices(topo.libtpu_name, "megacore" if megacore else "default", topo.slices, wrap)
    except Exception as e:  # libtpu refuses shapes it does not know
        raise UserError(f"--topology {topo.name!r}: libtpu has no slice {topo.libtpu_name}: {e}") from e
    if len(devices) != topo.num_devices:
        raise UserError(
            f"--topology {topo.name!r}: libtpu gave {len(devices)} devices for {topo.libtpu_name}, "
            f"expected {topo.num_devices}"
        )
    return list(devices)

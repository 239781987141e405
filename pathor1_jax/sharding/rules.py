"""Ordered logical-axis → mesh-axis rules: presets, config parsing and validation.

A rule list is read top to bottom; for each array dimension the first rule naming its logical
axis whose mesh axes are still unused in that array wins (`logical.logical_to_spec`). Parameters
and activations share logical names: in `(batch, length, embed)` the batch takes `fsdp` first, so
`embed` stays whole there, while an `[embed, mlp]` kernel is split over `fsdp` on `embed`.
Changing a preset changes no model code.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from jax.sharding import PartitionSpec

from pathor1_jax.errors import ConfigError
from pathor1_jax.logical import Rules, logical_to_spec
from pathor1_jax.sharding.mesh import AXES

LOGICAL_AXES: tuple[str, ...] = (
    "batch", "length",
    "vocab", "embed", "heads", "kv_heads", "mlp",
    "vision_embed", "vision_heads", "vision_mlp", "vision_patch", "vision_merge",
    "clip_proj",
    "layers",  # the stacked-layer axis of scanned models (`models/scan.py`): no preset splits it
)  # fmt: skip


def dp() -> list[tuple[str, str | tuple[str, ...] | None]]:
    """Pure data parallel: every parameter replicated, the batch split over all devices."""
    return [("batch", ("data", "fsdp", "tensor"))]


def fsdp() -> list[tuple[str, str | tuple[str, ...] | None]]:
    """ZeRO-3 style: parameters (and so gradients and optimizer state) split over `fsdp` on their
    model-width dimension; the batch over `data` × `fsdp` (× `tensor`, unused here)."""
    return [
        ("batch", ("data", "fsdp", "tensor")),
        ("embed", "fsdp"),
        ("vision_embed", "fsdp"),
        ("vision_merge", "fsdp"),
    ]


def fsdp_tp() -> list[tuple[str, str | tuple[str, ...] | None]]:
    """FSDP over `fsdp` plus Megatron tensor parallelism over `tensor` (heads, MLP width, vocab)."""
    return [
        ("batch", ("data", "fsdp")),
        ("embed", "fsdp"),
        ("vision_embed", "fsdp"),
        ("vision_merge", "fsdp"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("mlp", "tensor"),
        ("vocab", "tensor"),
        ("vision_heads", "tensor"),
        ("vision_mlp", "tensor"),
    ]


PRESETS = {"dp": dp, "fsdp": fsdp, "fsdp_tp": fsdp_tp}


def preset(name: str) -> list[tuple[str, str | tuple[str, ...] | None]]:
    if name not in PRESETS:
        raise ConfigError(f"unknown sharding preset {name!r}; presets are {sorted(PRESETS)}")
    return PRESETS[name]()


def normalize_rules(rules: Sequence) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
    """Rules from a config (lists of lists after ml_collections) → tuples; mesh axis names checked."""
    out = []
    for i, rule in enumerate(rules):
        if len(rule) != 2 or not isinstance(rule[0], str):
            raise ConfigError(f"sharding rule {i}: expected (logical_axis, mesh_axes), got {rule!r}")
        logical, target = rule
        if target is not None and not isinstance(target, str):
            target = tuple(target)
        names = () if target is None else (target,) if isinstance(target, str) else target
        unknown = [a for a in names if a not in AXES]
        if unknown:
            raise ConfigError(
                f"sharding rule {i} ({logical!r} -> {target!r}) names unknown mesh axis "
                f"{unknown[0]!r}; mesh axes are {list(AXES)}"
            )
        out.append((logical, target))
    return tuple(out)


def rules_from_config(config: Mapping | None) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
    """`sharding.rules` (explicit list) if given, else `sharding.preset` (default `fsdp`)."""
    config = dict(config or {})
    if config.get("rules"):
        return normalize_rules(config["rules"])
    return normalize_rules(preset(config.get("preset") or "fsdp"))


def mesh_axis_size(mesh_shape: Mapping[str, int], entry: str | tuple[str, ...] | None) -> int:
    if entry is None:
        return 1
    names = (entry,) if isinstance(entry, str) else entry
    return math.prod(mesh_shape[a] for a in names)


def check_divisible(
    path: str,
    shape: Sequence[int],
    axes: Sequence[str | None],
    spec: PartitionSpec,
    mesh_shape: Mapping[str, int],
) -> None:
    """Raise naming `path` and the dimension when a dimension does not split evenly."""
    for dim, (size, logical, entry) in enumerate(
        zip(shape, axes, tuple(spec) + (None,) * len(shape), strict=False)
    ):
        parts = mesh_axis_size(mesh_shape, entry)
        if size % parts:
            raise ConfigError(
                f"parameter {path}: dimension {dim} (logical axis {logical!r}, size {size}) is not "
                f"divisible by mesh axes {entry!r} of size {parts}; "
                f"change the mesh or the rule for {logical!r}"
            )


def spec_for(
    path: str,
    shape: Sequence[int],
    axes: Sequence[str | None] | None,
    rules: Rules,
    mesh_shape: Mapping[str, int],
) -> PartitionSpec:
    """The checked `PartitionSpec` of one array (replicated when it has no logical axes)."""
    if axes is None:
        return PartitionSpec()
    if len(axes) != len(shape):
        raise ConfigError(
            f"parameter {path}: logical axes {tuple(axes)} do not match its shape {tuple(shape)}"
        )
    spec = logical_to_spec(axes, rules)
    check_divisible(path, shape, axes, spec, mesh_shape)
    return spec

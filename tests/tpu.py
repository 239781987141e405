"""Deviceless TPU topologies for ahead-of-time compile tests (needs libtpu: mark tests `libtpu`).

    mesh = tpu_mesh("v5e:2x2", {"fsdp": -1})   # 4 v5e chips, our data/fsdp/tensor axes
    with jax.set_mesh(mesh), use_rules(mesh, rules):
        compiled = jax.jit(f).lower(*shape_dtype_structs).compile()   # XLA TPU + Mosaic
"""

from __future__ import annotations

import functools

import jax
from jax.experimental import topologies
from jax.sharding import Mesh

from pathor1_jax.sharding.mesh import make_mesh


@functools.cache
def topology_devices(name: str) -> tuple[jax.Device, ...]:
    """The devices of a TPU topology such as "v5e:2x2" (no hardware needed)."""
    return tuple(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)


def tpu_mesh(name: str, axes: dict) -> Mesh:
    """Our mesh (axes data / fsdp / tensor, Auto) over the devices of topology `name`."""
    return make_mesh(axes, devices=topology_devices(name))


def mosaic_calls(compiled) -> int:
    """How many Mosaic kernels (`tpu_custom_call`) a compiled executable runs."""
    return compiled.as_text().count('custom_call_target="tpu_custom_call"')

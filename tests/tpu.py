"""Deviceless TPU topologies for ahead-of-time compile tests (needs libtpu: mark tests `libtpu`).

    mesh = tpu_mesh("v5e:2x2", {"fsdp": -1})   # 4 v5e chips, our data/fsdp/tensor axes
    with jax.set_mesh(mesh), use_rules(mesh, rules):
        compiled = jax.jit(f).lower(*shape_dtype_structs).compile()   # XLA TPU + Mosaic

Pallas TPU lowering reads the chip from the mesh in context: lower inside `jax.set_mesh(mesh)`.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh

from pathor1_jax.sharding.mesh import make_mesh
from pathor1_jax.sharding.topology import parse_topology, topology_devices


def tpu_devices(name: str) -> list[jax.Device]:
    """The devices of a TPU topology such as "v5e:2x2" (no hardware needed), as `pathor1 compile`
    gets them (cached per topology)."""
    return topology_devices(parse_topology(name))


def tpu_mesh(name: str, axes: dict) -> Mesh:
    """Our mesh (axes data / fsdp / tensor, Auto) over the devices of topology `name`."""
    return make_mesh(axes, devices=tpu_devices(name))


def mosaic_calls(compiled) -> int:
    """How many Mosaic kernels (`tpu_custom_call`) a compiled executable runs."""
    return compiled.as_text().count('custom_call_target="tpu_custom_call"')

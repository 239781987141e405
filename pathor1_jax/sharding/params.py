"""Parameter shardings from logical axes, and models created directly sharded.

`create_sharded` traces the constructor abstractly (`nnx.eval_shape`), derives every variable's
`NamedSharding` from its logical axes and the rules, and runs the constructor under
`jax.jit(out_shardings=...)`, so each device only ever holds its own shard. `optimizer_shardings`
lays optimizer state out like the parameters it mirrors (FSDP shards the AdamW moments too).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from pathor1_jax.errors import ConfigError
from pathor1_jax.logical import Rules, use_rules
from pathor1_jax.models.layers import path_str
from pathor1_jax.sharding.rules import mesh_axis_size, spec_for


def logical_axes(variable: nnx.Variable) -> tuple[str | None, ...] | None:
    """The logical axis names a variable was annotated with (`layers.param`), or None."""
    meta = variable.get_metadata()
    axes = meta.get("sharding_names") or meta.get("out_sharding")
    return None if axes is None else tuple(axes)


@dataclass(frozen=True)
class ParamLayout:
    """One variable's layout: where it lives, how it is named and split, bytes per device."""

    path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    axes: tuple[str | None, ...] | None
    spec: PartitionSpec
    is_param: bool

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def shard_shape(self, mesh_shape: dict[str, int]) -> tuple[int, ...]:
        entries = tuple(self.spec) + (None,) * (len(self.shape) - len(self.spec))
        return tuple(d // mesh_axis_size(mesh_shape, e) for d, e in zip(self.shape, entries, strict=False))

    def shard_size(self, mesh_shape: dict[str, int]) -> int:
        return math.prod(self.shard_shape(mesh_shape))


def _mesh_shape(mesh: Mesh | AbstractMesh) -> dict[str, int]:
    return dict(mesh.shape)


def layouts(state: nnx.State, mesh: Mesh | AbstractMesh, rules: Rules) -> list[ParamLayout]:
    """Layouts of every variable of an (abstract) state; raises on an indivisible dimension."""
    shape = _mesh_shape(mesh)
    out, errors = [], []
    for path, var in nnx.to_flat_state(state):
        value = var.get_value()
        if not hasattr(value, "shape"):
            continue
        name = path_str(path)
        axes = logical_axes(var)
        try:
            spec = spec_for(name, value.shape, axes, rules, shape)
        except ValueError as e:
            errors.append(str(e))
            continue
        out.append(
            ParamLayout(
                path=name,
                shape=tuple(value.shape),
                dtype=np.dtype(value.dtype)
                if not jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key)
                else np.dtype("uint32"),
                axes=axes,
                spec=spec,
                is_param=isinstance(var, nnx.Param),
            )
        )
    if errors:
        more = f"; and {len(errors) - 10} more" if len(errors) > 10 else ""
        raise ConfigError("; ".join(errors[:10]) + more)  # one line (the CLI's error contract)
    return out


def canonical(spec: PartitionSpec) -> PartitionSpec:
    """`spec` without trailing `None`s: the form jit gives its outputs, so a step's output state
    compares equal to its input state and the next step reuses the executable."""
    entries = list(spec)
    while entries and entries[-1] is None:
        entries.pop()
    return PartitionSpec(*entries)


def state_shardings(state: nnx.State, mesh: Mesh | AbstractMesh, rules: Rules) -> nnx.State:
    """A tree like `state` whose leaves are the `NamedSharding` of each variable (canonical specs)."""
    specs = {layout.path: canonical(layout.spec) for layout in layouts(state, mesh, rules)}
    flat = []
    for path, var in nnx.to_flat_state(state):
        spec = specs.get(path_str(path), PartitionSpec())
        flat.append((path, var.replace(NamedSharding(mesh, spec))))
    return nnx.from_flat_state(flat)


def abstract_params(state: nnx.State, mesh: Mesh | AbstractMesh, rules: Rules) -> dict:
    """The `nnx.Param`s of an (abstract) state as a pure dict (the train state's `params`) of
    ShapeDtypeStructs carrying their rule-given `NamedSharding`."""
    params = nnx.filter_state(state, nnx.Param)
    shardings = nnx.to_pure_dict(state_shardings(params, mesh, rules))
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nnx.to_pure_dict(params), shardings
    )


def optimizer_shardings(opt_state: Any, params: Any, mesh: Mesh | AbstractMesh) -> Any:
    """A tree like `opt_state` (arrays or ShapeDtypeStructs) of `NamedSharding`s: each leaf whose key
    path ends with a parameter's path and has that parameter's shape (AdamW's `mu` and `nu`, under
    whatever optax wrappers) is laid out like the parameter; every other leaf (step counts, scalars,
    factored statistics) is replicated on `mesh`.

    params: the parameters as in the train state (a pure dict) of arrays or ShapeDtypeStructs, each
    carrying its `NamedSharding`.
    """
    by_path = {
        _keys(path): (tuple(leaf.shape), leaf.sharding)
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    replicated = NamedSharding(mesh, PartitionSpec())

    def place(path, leaf) -> NamedSharding:
        keys = _keys(path)
        for start in range(len(keys)):  # the longest suffix that is a parameter's path
            shape, sharding = by_path.get(keys[start:], (None, None))
            if sharding is not None and shape == tuple(leaf.shape):
                return sharding
        return replicated

    return jax.tree_util.tree_map_with_path(place, opt_state)


def _keys(path: tuple) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def create_sharded(make_model: Callable[[], nnx.Module], mesh: Mesh, rules: Rules) -> nnx.Module:
    """Build `make_model()` with every variable created directly in its sharded layout."""
    abstract = nnx.eval_shape(make_model)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh, rules)

    def init() -> nnx.State:
        with use_rules(mesh, rules):
            return nnx.state(make_model())

    return nnx.merge(graphdef, jax.jit(init, out_shardings=shardings)())


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules) -> nnx.Module:
    """Move an existing model's variables to their rule-given shardings (in place)."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, state_shardings(state, mesh, rules)))
    return model

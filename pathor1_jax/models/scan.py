"""A stack of identical layers run as one traced body (`jax.lax.scan`), with a remat policy.

    layers = stack_layers([Block(...) for _ in range(n)])    # every variable gets a leading [n] axis
    x, ys = run_layers(layers, lambda block, x, xs_i: (block(x), None), x, remat="full")

`stack_layers` builds the layers one by one (the same random initialisation as an unrolled
`nnx.List`) and stacks each variable on a new leading axis named `"layers"` (a logical axis: no
sharding rule names it by default, so every device holds all layers of its shard). `run_layers`
traces the body once and scans it over the stack, so compile time does not grow with depth; given an
`nnx.List` instead it runs the same body layer by layer (the unrolled path, for parity debugging).
Checkpoints keep per-layer names: the converters stack and unstack (see the models' `checkpoint.py`).

Remat policies (applied to each layer's body; MaxText's names in brackets):
    none           save every activation the backward pass needs (no recomputation)
    full           save only each layer's input, recompute the layer in the backward pass [full]
    dots           save the outputs of matmuls, recompute the element-wise rest
    dots_no_batch  save matmul outputs without batch dimensions (weights-only products) [minimal]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

LAYERS_AXIS = "layers"
REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}

LayerFn = Callable[[nnx.Module, Any, Any], tuple[Any, Any]]


def check_remat(policy: str) -> str:
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat policy {policy!r} is not one of {sorted(REMAT_POLICIES)}")
    return policy


def stack_layers(modules: Sequence[nnx.Module], axis: str = LAYERS_AXIS) -> nnx.Module:
    """One module shaped like `modules[0]` whose every variable holds all modules' values stacked on
    a new leading axis, with `axis` prepended to its logical axis names."""
    graphdef, _ = nnx.split(modules[0])
    flats = [nnx.to_flat_state(nnx.state(m)) for m in modules]
    stacked = []
    for i, (path, var) in enumerate(flats[0]):
        value = jnp.stack([flat[i][1].get_value() for flat in flats])
        names = var.get_metadata().get("out_sharding")
        extra = {} if names is None else {"out_sharding": (axis, *names)}
        stacked.append((path, var.replace(value, **extra)))
    return nnx.merge(graphdef, nnx.from_flat_state(stacked))


def layer_paths(path: tuple, stacks: Mapping[tuple, int]) -> list[tuple] | None:
    """The per-layer paths a stacked variable holds, or None when `path` is in no stack.

    stacks: the path of each `stack_layers` stack in the model → its depth; a variable
    `(*stack, "mlp", "kernel")` of shape `[n, ...]` holds `(*stack, i, "mlp", "kernel")` for i < n,
    the paths of the unrolled model (and so the per-layer checkpoint names).
    """
    for prefix, depth in stacks.items():
        if path[: len(prefix)] == prefix:
            return [(*prefix, i, *path[len(prefix) :]) for i in range(depth)]
    return None


def is_stacked(layers: nnx.Module) -> bool:
    """True for a `stack_layers` stack, False for an unrolled `nnx.List` of layers."""
    return not isinstance(layers, nnx.List)


def run_layers(layers: nnx.Module, fn: LayerFn, carry: Any, xs: Any = None, *, remat: str = "none"):
    """`(carry, ys)`: `carry, y_i = fn(layer_i, carry, xs_i)` for every layer in order, where `xs`
    and the stacked `ys` have a leading layer axis (either may be None).

    A stacked module is scanned (one traced body); an `nnx.List` is unrolled with the same body.
    `remat` names a policy of `REMAT_POLICIES`, applied to each layer.
    """
    policy = REMAT_POLICIES[check_remat(remat)]

    def body_for(graphdef: nnx.GraphDef, prevent_cse: bool):
        def body(carry, inputs):
            state, x = inputs
            return fn(nnx.merge(graphdef, state), carry, x)

        if remat == "none":
            return body
        return jax.checkpoint(body, policy=policy, prevent_cse=prevent_cse)

    if is_stacked(layers):
        graphdef, state = nnx.split(layers)
        # inside scan, CSE cannot merge the recomputation into the forward pass: no barrier needed
        return jax.lax.scan(body_for(graphdef, prevent_cse=False), carry, (state, xs))
    ys = []
    for i, layer in enumerate(layers):
        graphdef, state = nnx.split(layer)
        x = None if xs is None else jax.tree.map(lambda a, i=i: a[i], xs)
        carry, y = body_for(graphdef, prevent_cse=True)(carry, (state, x))
        ys.append(y)
    return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys) if ys and ys[0] is not None else None

"""The generic optimizer step shared by the stages: gradient accumulation, freezing, AdamW update.

A train state is a plain dict (what orbax checkpoints):
    params     the model's `nnx.Param` values as a pure nested dict (float32 master weights)
    opt_state  the optax state
    step       int32 scalar: optimizer updates done
    rng        uint32 [2]: the run's PRNG key, folded with `step` for anything stochastic

With a mesh, parameters carry their rule-given shardings and the optimizer state is laid out like
the parameters it mirrors (`sharding.params.optimizer_shardings`: FSDP shards the AdamW moments);
`step` and `rng` are replicated. `abstract_state` gives the same layout as ShapeDtypeStructs, for
compiling a step ahead of time without allocating anything.

Every update goes through `apply_gradients`: an update whose loss, gradient norm or resulting
parameters are not finite is not applied (the state comes back unchanged, `step` not counted) and
the metrics say so (`nonfinite` = 1); the trainer then stops or skips (`train.on_nonfinite`).

A batch holds `accum` micro-batches stacked on a leading axis. A stage supplies
`nll_fn(model, micro) -> (nll [B, T], valid [B, T])`; the step sums the NLL over all valid tokens of
all micro-batches and divides by their count, so accumulation gives exactly the token mean of the
whole batch (not a mean of micro-batch means).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pathor1_jax.logical import Rules
from pathor1_jax.sharding.params import abstract_params, optimizer_shardings
from pathor1_jax.train.optim import FROZEN, param_labels

NllFn = Callable[[nnx.Module, dict], tuple[jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Everything static about a step: how to rebuild the model, the optimizer, what is frozen."""

    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    freeze: tuple[str, ...] = ()


def _split_params(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State]:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(rest):
        names = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(rest)][:5]
        raise ValueError(f"the trainer expects only nnx.Param variables; found others: {names}")
    return graphdef, params


def _mesh_of(params: Any) -> Mesh | None:
    """The mesh every parameter is laid out on, or None when they are not all `NamedSharding`s."""
    shardings = [x.sharding for x in jax.tree.leaves(params)]
    if shardings and all(isinstance(s, NamedSharding) for s in shardings):
        return shardings[0].mesh
    return None


def init_opt_state(tx: optax.GradientTransformation, params: Any) -> Any:
    """`tx.init(params)`, born in `optimizer_shardings` when the parameters sit on a mesh."""
    mesh = _mesh_of(params)
    if mesh is None:
        return jax.jit(tx.init)(params)
    shardings = optimizer_shardings(jax.eval_shape(tx.init, params), params, mesh)
    return jax.jit(tx.init, out_shardings=shardings)(params)


def init_state(model: nnx.Module, tx: optax.GradientTransformation, seed: int) -> tuple[nnx.GraphDef, dict]:
    """`(graphdef, state)` for `model`, whose variables must all be `nnx.Param`."""
    graphdef, params = _split_params(model)
    return graphdef, params_state(nnx.to_pure_dict(params), tx, seed)


def params_state(params: dict, tx: optax.GradientTransformation, seed: int) -> dict:
    """The step-0 state of the parameters `params` (a pure dict): fresh optimizer state, `step` 0,
    the run's key; on the parameters' mesh when they sit on one."""
    state = {
        "params": params,
        "opt_state": init_opt_state(tx, params),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.PRNGKey(seed),
    }
    mesh = _mesh_of(params)
    if mesh is not None:
        replicated = NamedSharding(mesh, PartitionSpec())
        state["step"], state["rng"] = jax.device_put((state["step"], state["rng"]), replicated)
    return state


def abstract_state(
    make_model: Callable[[], nnx.Module], tx: optax.GradientTransformation, mesh: Mesh, rules: Rules
) -> tuple[nnx.GraphDef, dict]:
    """`(graphdef, state)` like `init_state` on `mesh` (which may be abstract, e.g. TPU topology
    devices), with ShapeDtypeStructs carrying the shardings the trainer gives each leaf: the
    arguments for `jax.jit(step).lower(spec, state, batch)` ahead of time. Nothing is allocated."""
    graphdef, params = _split_params(nnx.eval_shape(make_model))
    params = abstract_params(params, mesh, rules)
    opt_state = jax.eval_shape(tx.init, params)
    opt_shardings = optimizer_shardings(opt_state, params, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    state = {
        "params": params,
        "opt_state": jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), opt_state, opt_shardings
        ),
        "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
        "rng": jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated),
    }
    return graphdef, state


def zero_frozen(grads: Any, freeze: tuple[str, ...]) -> Any:
    """Frozen gradients replaced by zeros (so XLA never computes them)."""
    if not freeze:
        return grads
    labels = param_labels(grads, freeze)
    return jax.tree.map(lambda g, label: jnp.zeros_like(g) if label == FROZEN else g, grads, labels)


def apply_gradients(spec: StepSpec, state: dict, grads: Any, loss: jax.Array) -> tuple[dict, dict]:
    """The optimizer update of `state` by `grads`, applied only when `loss`, the gradient norm and
    the updated parameters are all finite; else `state` unchanged. Returns `(state, metrics)` with
    `grad_norm` and `nonfinite` (0 or 1)."""
    params = state["params"]
    updates, opt_state = spec.tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(new_params))

    def keep(new, old):
        return jnp.where(finite, new, old)

    new_state = {
        **state,
        "params": jax.tree.map(keep, new_params, params),
        "opt_state": jax.tree.map(keep, opt_state, state["opt_state"]),
        "step": state["step"] + finite.astype(state["step"].dtype),
    }
    return new_state, {"grad_norm": grad_norm, "nonfinite": (~finite).astype(jnp.int32)}


def train_step(spec: StepSpec, nll_fn: NllFn, state: dict, batch: dict) -> tuple[dict, dict]:
    """One optimizer update from `batch` (leaves `[accum, ...]`); returns `(state, metrics)`."""
    params = state["params"]

    def micro_sums(p, micro):
        nll, valid = nll_fn(nnx.merge(spec.graphdef, p), micro)
        return jnp.where(valid, nll, 0.0).sum(), valid.sum()

    grad_fn = jax.value_and_grad(micro_sums, has_aux=True)

    def accumulate(carry, micro):
        nll_sum, count, grads = carry
        (s, c), g = grad_fn(params, micro)
        return (nll_sum + s, count + c, jax.tree.map(jnp.add, grads, g)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    carry = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), zeros)
    (nll_sum, count, grads), _ = jax.lax.scan(accumulate, carry, batch)
    denom = jnp.maximum(count, 1).astype(jnp.float32)
    grads = zero_frozen(jax.tree.map(lambda g: g / denom, grads), spec.freeze)
    loss = nll_sum / denom
    new_state, update_metrics = apply_gradients(spec, state, grads, loss)
    metrics = {"loss": loss, "loss_tokens": count, **update_metrics, "param_norm": optax.tree.norm(params)}
    return new_state, metrics


def jit_step(nll_fn: NllFn) -> Callable[[StepSpec, dict, dict], tuple[dict, dict]]:
    """`train_step` for one stage's `nll_fn`, jitted with the spec static and the state donated."""

    def step(spec: StepSpec, state: dict, batch: dict) -> tuple[dict, dict]:
        return train_step(spec, nll_fn, state, batch)

    return jax.jit(step, static_argnums=0, donate_argnums=1)

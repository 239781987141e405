"""The generic optimizer step shared by the stages: gradient accumulation, freezing, AdamW update.

A train state is a plain dict (what orbax checkpoints):
    params     the model's `nnx.Param` values as a pure nested dict (float32 master weights)
    opt_state  the optax state
    step       int32 scalar: optimizer updates done
    rng        uint32 [2]: the run's PRNG key, folded with `step` for anything stochastic

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

from pathor1_jax.train.optim import FROZEN, param_labels

NllFn = Callable[[nnx.Module, dict], tuple[jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Everything static about a step: how to rebuild the model, the optimizer, what is frozen."""

    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    freeze: tuple[str, ...] = ()


def init_state(model: nnx.Module, tx: optax.GradientTransformation, seed: int) -> tuple[nnx.GraphDef, dict]:
    """`(graphdef, state)` for `model`, whose variables must all be `nnx.Param`."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(rest):
        names = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(rest)][:5]
        raise ValueError(f"the trainer expects only nnx.Param variables; found others: {names}")
    params = nnx.to_pure_dict(params)
    state = {
        "params": params,
        "opt_state": jax.jit(tx.init)(params),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.PRNGKey(seed),
    }
    return graphdef, state


def zero_frozen(grads: Any, freeze: tuple[str, ...]) -> Any:
    """Frozen gradients replaced by zeros (so XLA never computes them)."""
    if not freeze:
        return grads
    labels = param_labels(grads, freeze)
    return jax.tree.map(lambda g, label: jnp.zeros_like(g) if label == FROZEN else g, grads, labels)


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
    updates, opt_state = spec.tx.update(grads, state["opt_state"], params)
    new_state = {
        "params": optax.apply_updates(params, updates),
        "opt_state": opt_state,
        "step": state["step"] + 1,
        "rng": state["rng"],
    }
    metrics = {
        "loss": nll_sum / denom,
        "loss_tokens": count,
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(params),
    }
    return new_state, metrics


def jit_step(nll_fn: NllFn) -> Callable[[StepSpec, dict, dict], tuple[dict, dict]]:
    """`train_step` for one stage's `nll_fn`, jitted with the spec static and the state donated."""

    def step(spec: StepSpec, state: dict, batch: dict) -> tuple[dict, dict]:
        return train_step(spec, nll_fn, state, batch)

    return jax.jit(step, static_argnums=0, donate_argnums=1)

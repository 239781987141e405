"""Group-relative advantages of GRPO and DAPO: A_i = (r_i − mean(r)) / (std(r) + eps) per prompt group."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def group_advantages(rewards: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Advantages `[N, G]` of the rewards `[N, G]` of N prompt groups of G sampled responses each.

    The std is the population std (ddof = 0), σ = sqrt(mean((r − mean)²)): it is defined for every G
    (including G = 1, where the sample std divides by zero), and it makes the advantages of a group
    exactly zero-mean with unit root-mean-square (up to eps) whatever G is, so the loss scale does not
    depend on the group size. A group whose rewards are all equal carries no learning signal and gets
    exactly zero advantages (never NaN). Every response token shares its sequence's advantage.
    """
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be [num_groups, group_size], got shape {rewards.shape}")
    rewards = rewards.astype(jnp.float32)
    mean = rewards.mean(axis=1, keepdims=True)
    std = rewards.std(axis=1, keepdims=True)
    constant = rewards.max(axis=1, keepdims=True) == rewards.min(axis=1, keepdims=True)
    return jnp.where(constant, 0.0, (rewards - mean) / (std + eps))

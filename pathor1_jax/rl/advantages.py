"""Group-relative advantages of GRPO and DAPO: A_i = (r_i − mean(r)) / (std(r) + eps) per prompt group."""

from __future__ import annotations

import jax
import jax.numpy as jnp

ADVANTAGE_STDS = ("population", "unbiased")


def group_advantages(rewards: jax.Array, eps: float = 1e-6, std: str = "population") -> jax.Array:
    """Advantages `[N, G]` of the rewards `[N, G]` of N prompt groups of G sampled responses each.

    std="population" (the default; σ_{r} of the paper read literally): sqrt(mean((r − mean)²)),
    defined for every G, and it makes the advantages of a group exactly zero-mean with unit
    root-mean-square (up to eps) whatever G is. std="unbiased": the Bessel-corrected sample std
    (ddof = 1, `torch.std` as verl and EasyR1 use), √(G/(G−1)) smaller advantages than population.
    A group whose rewards are all equal (G = 1 included) carries no learning signal and gets exactly
    zero advantages (never NaN). Every response token shares its sequence's advantage.
    """
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be [num_groups, group_size], got shape {rewards.shape}")
    if std not in ADVANTAGE_STDS:
        raise ValueError(f"advantage std must be one of {ADVANTAGE_STDS}, got {std!r}")
    rewards = rewards.astype(jnp.float32)
    mean = rewards.mean(axis=1, keepdims=True)
    ddof = 1 if std == "unbiased" and rewards.shape[1] > 1 else 0
    sigma = rewards.std(axis=1, keepdims=True, ddof=ddof)
    constant = rewards.max(axis=1, keepdims=True) == rewards.min(axis=1, keepdims=True)
    return jnp.where(constant, 0.0, (rewards - mean) / (sigma + eps))

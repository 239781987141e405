"""The GRPO (Eq. 1) and DAPO (Eq. 2) policy losses of Patho-R1, on the fused clipped policy-loss kernel.

Both take the policy's final hidden states over the response tokens and its LM head, never the
`[B, T, V]` logits: `pathor1_jax.kernels.policy_loss.clipped_policy_loss` computes the per-token
log-probs, the ratio r = π_θ / π_old, the clipped surrogate and (GRPO) the k3 KL in one pass; its
`impl` selects the Pallas kernel or the plain-jnp reference. The losses are the negated objectives.

Shapes: hidden `[B, T, D]`, lm_head `[D, V]`, tokens / old_logprobs / ref_logprobs / mask `[B, T]`
(response tokens only, 1 = a real token), advantages `[B]` (one per sequence). B = num_groups · G
with the G responses of a prompt contiguous.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pathor1_jax.kernels.policy_loss import clipped_policy_loss


def k3_kl(logprobs: jax.Array, ref_logprobs: jax.Array) -> jax.Array:
    """Per-token k3 estimate of KL(π_θ ‖ π_ref): exp(ref − logp) − (ref − logp) − 1 ≥ 0."""
    delta = ref_logprobs - logprobs
    return jnp.exp(delta) - delta - 1.0


def grpo_loss(
    hidden: jax.Array,
    lm_head: jax.Array,
    tokens: jax.Array,
    old_logprobs: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    ref_logprobs: jax.Array | None,
    *,
    epsilon: float,
    beta: float,
    impl: str = "auto",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """−J_GRPO (Eq. 1): per-sequence token mean of min(r·A, clip(r, 1−ε, 1+ε)·A) − β·KL_k3, then the
    mean over sequences (= the mean over groups of the 1/G group sums, all groups holding G).

    `ref_logprobs` are the frozen reference model's (the SFT checkpoint); None only with β = 0.
    """
    if beta != 0.0 and ref_logprobs is None:
        raise ValueError("grpo_loss: beta != 0 needs ref_logprobs from the frozen reference model")
    return clipped_policy_loss(
        hidden,
        lm_head,
        tokens,
        old_logprobs,
        advantages,
        mask,
        eps_low=epsilon,
        eps_high=epsilon,
        ref_logprobs=ref_logprobs if beta != 0.0 else None,
        beta=beta,
        agg="seq-mean-token-mean",
        impl=impl,
    )


def group_token_weights(mask: jax.Array, group_size: int) -> jax.Array:
    """Per-sequence weights `[B]` that turn a batch token mean into Eq. 2's mean over groups of
    per-group token means: w_g = (Σ_all |o|) / (n_groups · Σ_{i∈g} |o_i|).

    Groups without tokens (padding groups of a short dynamic-sampling batch) get weight 0 and do
    not count in n_groups.
    """
    b = mask.shape[0]
    if b % group_size:
        raise ValueError(f"batch of {b} sequences is not a whole number of groups of {group_size}")
    group_tokens = mask.astype(jnp.float32).sum(axis=1).reshape(b // group_size, group_size).sum(axis=1)
    real = group_tokens > 0
    n_groups = jnp.maximum(real.sum(), 1)
    weights = jnp.where(real, group_tokens.sum() / (n_groups * jnp.maximum(group_tokens, 1.0)), 0.0)
    return jnp.repeat(weights, group_size)


def dapo_loss(
    hidden: jax.Array,
    lm_head: jax.Array,
    tokens: jax.Array,
    old_logprobs: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    group_size: int,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    impl: str = "auto",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """−J_DAPO (Eq. 2): the token-level mean over all Σ|o_i| tokens of each group of
    min(r·A, clip(r, 1−ε_low, 1+ε_high)·A) (clip-higher), averaged over groups; no KL term.

    The kernel's batch token mean is made per-group by scaling each sequence's advantage with
    `group_token_weights` (min(r·wA, clip(r)·wA) = w·min(r·A, clip(r)·A) for w ≥ 0); when every
    group has the same token count the weights are 1 and this is the plain batch token mean.
    """
    weights = group_token_weights(mask, group_size)
    return clipped_policy_loss(
        hidden,
        lm_head,
        tokens,
        old_logprobs,
        advantages * weights,
        mask,
        eps_low=eps_low,
        eps_high=eps_high,
        ref_logprobs=None,
        beta=0.0,
        agg="token-mean",
        impl=impl,
    )

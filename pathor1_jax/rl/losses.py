"""The GRPO (Eq. 1) and DAPO (Eq. 2) policy losses of Patho-R1, on the fused clipped policy-loss kernel.

Both take the policy's final hidden states over the response tokens and its LM head, never the
`[B, T, V]` logits: `pathor1_jax.kernels.policy_loss.clipped_policy_loss` computes the per-token
log-probs (at the sampling temperature), the ratio r = π_θ / π_old, the clipped surrogate and (GRPO)
the k3 KL in one pass; its `impl` selects the Pallas kernel or the plain-jnp reference. The losses
are the negated objectives.

Each defaults to its equation as the paper writes it; the switches verl and EasyR1 expose are
options (README, "RL settings: paper, verl, EasyR1"):
- `agg`: "seq-mean-token-mean" (Eq. 1: each response's token mean, then the mean over responses),
  "group-mean-token-mean" (Eq. 2: 1/Σ_i|o_i| over each group's tokens, then the mean over groups) or
  "token-mean" (every token of the mini-batch pooled: verl's default and its DAPO recipe).
- `dual_clip`: None, or c > 1 bounding a negative-advantage token's objective below by c·A (verl's
  `clip_ratio_c` = 3.0, EasyR1's `clip_ratio_dual` = 3.0).
- `temperature`: the rollout temperature T; log-probs are those of softmax(logits / T).

Shapes: hidden `[B, T, D]`, lm_head `[D, V]`, tokens / old_logprobs / ref_logprobs / mask `[B, T]`
(response tokens only, 1 = a real token), advantages `[B]` (one per sequence). B = num_groups · G
with the G responses of a prompt contiguous.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pathor1_jax.kernels.policy_loss import AGG_MODES, clipped_policy_loss

__all__ = ["AGG_MODES", "dapo_loss", "grpo_loss", "k3_kl"]


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
    group_size: int = 1,
    agg: str = "seq-mean-token-mean",
    dual_clip: float | None = None,
    temperature: float = 1.0,
    impl: str = "auto",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """−J_GRPO (Eq. 1): per-sequence token mean of min(r·A, clip(r, 1−ε, 1+ε)·A) − β·KL_k3, then the
    mean over sequences (= the mean over groups of the 1/G group sums, all groups holding G).

    `ref_logprobs` are the frozen reference model's (the SFT checkpoint); None only with β = 0.
    `group_size` matters only for agg "group-mean-token-mean".
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
        agg=agg,
        group_size=group_size,
        dual_clip=dual_clip,
        temperature=temperature,
        impl=impl,
    )


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
    agg: str = "group-mean-token-mean",
    dual_clip: float | None = None,
    temperature: float = 1.0,
    impl: str = "auto",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """−J_DAPO (Eq. 2): the token-level mean over all Σ|o_i| tokens of each group of
    min(r·A, clip(r, 1−ε_low, 1+ε_high)·A) (clip-higher), averaged over groups; no KL term.

    Groups without tokens (the padding of a short dynamic-sampling batch) do not count.
    """
    return clipped_policy_loss(
        hidden,
        lm_head,
        tokens,
        old_logprobs,
        advantages,
        mask,
        eps_low=eps_low,
        eps_high=eps_high,
        ref_logprobs=None,
        beta=0.0,
        agg=agg,
        group_size=group_size,
        dual_clip=dual_clip,
        temperature=temperature,
        impl=impl,
    )

"""Next-token cross-entropy for CPT and SFT: token mean over labels != -100, packing aware.

Labels follow the Hugging Face convention: `labels[t]` is the token that `logits[t - 1]` predicts
(the shift happens here). In a packed row the first token of a segment is never a target of the
previous segment's last token: a target counts only when it is in the same segment as its input.
The LM head is applied only where a target is (`kernels.policy_loss.gathered_logprobs`): the
labelled positions of a block of rows (the whole batch on one device, each device's rows on a
sharded batch) are gathered to its front, taken in chunks (chunks past the largest block's count
skipped, forward and backward) and vocabulary tiles, so the `[B, T, V]` logits are never
materialised and an SFT batch whose labels cover 20% of the positions pays ~20% of the LM head
(rounded up to one chunk).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pathor1_jax.kernels.policy_loss import CHUNKED_VOCAB_TILE, gathered_logprobs

IGNORE_INDEX = -100


def shifted_targets(labels: jax.Array, segment_ids: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """labels `[B, T]` → (targets `[B, T]`, valid `[B, T]` bool): position t predicts labels[t + 1].

    The last position has no target; with `segment_ids` a target is valid only within a segment
    (and never on padding, segment id 0).
    """
    targets = jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], IGNORE_INDEX)], axis=1)
    valid = targets != IGNORE_INDEX
    if segment_ids is not None:
        next_seg = jnp.concatenate([segment_ids[:, 1:], jnp.zeros_like(segment_ids[:, :1])], axis=1)
        valid &= (next_seg == segment_ids) & (segment_ids != 0)
    return jnp.where(valid, targets, 0), valid


def per_token_nll(
    hidden: jax.Array,
    lm_head: jax.Array,
    targets: jax.Array,
    chunk: int = 256,
    valid: jax.Array | None = None,
    groups: int = 1,
    vocab_tile: int = CHUNKED_VOCAB_TILE,
) -> jax.Array:
    """Negative log-likelihood `[B, T]` of `targets` under `softmax(hidden @ lm_head)` (0 where not
    `valid`): `-gathered_logprobs` (`kernels.policy_loss`), which computes the head only at the
    valid positions, gathered per block of `groups`, `chunk` positions per row and `vocab_tile`
    columns at a time, with its own backward pass. hidden `[B, T, D]`, lm_head `[D, V]`, in the
    dtype the matmul runs in (float32 accumulation and logits)."""
    logp = gathered_logprobs(
        hidden, lm_head, targets, valid, chunk=chunk, groups=groups, vocab_tile=vocab_tile
    )
    return -logp if valid is None else jnp.where(valid, -logp, 0.0)


def token_mean_loss(nll: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean of `nll` over valid tokens (0 when there are none)."""
    count = valid.sum()
    return jnp.where(valid, nll, 0.0).sum() / jnp.maximum(count, 1)

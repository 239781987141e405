"""Next-token cross-entropy for CPT and SFT: token mean over labels != -100, packing aware.

Labels follow the Hugging Face convention: `labels[t]` is the token that `logits[t - 1]` predicts
(the shift happens here). In a packed row the first token of a segment is never a target of the
previous segment's last token: a target counts only when it is in the same segment as its input.
The LM head is applied in chunks under `jax.checkpoint`, so the `[B, T, V]` logits are never
materialised whole (forward or backward), and only where a target is: the labelled positions of a
block of rows (the whole batch on one device, each device's rows on a sharded batch) are gathered to
its front and chunks past the largest block's count are skipped, so an SFT batch whose labels cover
20% of the positions pays ~20% of the LM head (rounded up to one chunk).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

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
    logits_fn: Callable[[jax.Array], jax.Array],
    targets: jax.Array,
    chunk: int = 256,
    valid: jax.Array | None = None,
    groups: int = 1,
) -> jax.Array:
    """Negative log-likelihood `[B, T]` of `targets` under `logits_fn(hidden)`, `chunk` positions
    per row at a time. hidden `[B, T, D]`; `logits_fn` maps `[G, c, D]` → float32 logits `[G, c, V]`.

    valid `[B, T]` bool: compute only there (0 elsewhere). The rows are taken in `groups` blocks of
    consecutive rows (1: the whole batch; a sharded batch: its number of shards, so that a block
    never leaves its device); each block's valid positions are moved to its front (stable, so in
    order) and a chunk of `B / groups · chunk` positions that no block reaches is skipped
    (`lax.cond`, forward and backward), so the cost follows the largest block's count of valid
    positions, not B · T. Every position's NLL is its own row's: the grouping changes only which
    positions share a chunk.
    """
    b, t, d = hidden.shape
    if valid is None:
        groups = b  # every position computed, one row per block: nothing to move
    elif b % groups:
        raise ValueError(f"per_token_nll: {b} rows do not split into {groups} blocks")
    n_pos = b // groups * t  # positions per block
    hidden = hidden.reshape(groups, n_pos, d)
    targets = targets.reshape(groups, n_pos)
    chunk = min(chunk * (b // groups), n_pos)
    order = None
    if valid is not None:
        flat_valid = valid.reshape(groups, n_pos)
        order = jnp.argsort(~flat_valid, axis=1, stable=True)  # [G, N]: each block's valid first
        hidden = jnp.take_along_axis(hidden, order[..., None], axis=1)
        targets = jnp.take_along_axis(targets, order, axis=1)
        count = flat_valid.sum(axis=1).max()  # chunks at or past it hold no valid position of any block
    pad = -n_pos % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    n = (n_pos + pad) // chunk
    hs = hidden.reshape(groups, n, chunk, d).swapaxes(0, 1)  # [n, G, c, D]
    ts = targets.reshape(groups, n, chunk).swapaxes(0, 1)  # [n, G, c]

    @jax.checkpoint
    def chunk_nll(h, tgt):
        logits = logits_fn(h).astype(jnp.float32)  # [G, c, V]
        picked = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]
        return jax.nn.logsumexp(logits, axis=-1) - picked  # [G, c]

    def skip(h, tgt):
        return jnp.zeros(tgt.shape, jnp.float32)

    def body(carry, xs):
        i, h, tgt = xs
        if order is None:
            return carry, chunk_nll(h, tgt)
        return carry, jax.lax.cond(i * chunk < count, chunk_nll, skip, h, tgt)

    _, nll = jax.lax.scan(body, None, (jnp.arange(n), hs, ts))
    nll = nll.swapaxes(0, 1).reshape(groups, n_pos + pad)[:, :n_pos]  # [G, N]
    if order is not None:
        nll = jnp.take_along_axis(nll, jnp.argsort(order, axis=1), axis=1)  # back to the positions
    nll = nll.reshape(b, t)
    return nll if valid is None else jnp.where(valid, nll, 0.0)


def token_mean_loss(nll: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean of `nll` over valid tokens (0 when there are none)."""
    count = valid.sum()
    return jnp.where(valid, nll, 0.0).sum() / jnp.maximum(count, 1)

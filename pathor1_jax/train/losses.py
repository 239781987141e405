"""Next-token cross-entropy for CPT and SFT: token mean over labels != -100, packing aware.

Labels follow the Hugging Face convention: `labels[t]` is the token that `logits[t - 1]` predicts
(the shift happens here). In a packed row the first token of a segment is never a target of the
previous segment's last token: a target counts only when it is in the same segment as its input.
The LM head is applied in chunks of `chunk` positions under `jax.checkpoint`, so the `[B, T, V]`
logits are never materialised whole (forward or backward), and only where a target is: each row's
labelled positions are gathered to its front and chunks past the longest row's count are skipped, so
an SFT batch whose labels cover 20% of the positions pays ~20% of the LM head (rounded up to chunks).
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
) -> jax.Array:
    """Negative log-likelihood `[B, T]` of `targets` under `logits_fn(hidden)`, `chunk` positions at
    a time. hidden `[B, T, D]`; `logits_fn` maps `[B, c, D]` → float32 logits `[B, c, V]`.

    valid `[B, T]` bool: compute only there (0 elsewhere). Each row's valid positions are moved to
    its front (stable, so in order) and a chunk that no row reaches is skipped (`lax.cond`, forward
    and backward), so the cost follows the longest row's count of valid positions, not T.
    """
    b, t, d = hidden.shape
    chunk = min(chunk, t)
    order = None
    if valid is not None:
        order = jnp.argsort(~valid, axis=1, stable=True)  # [B, T]: each row's valid positions first
        hidden = jnp.take_along_axis(hidden, order[..., None], axis=1)
        targets = jnp.take_along_axis(targets, order, axis=1)
        count = valid.sum(axis=1).max()  # chunks at or past it hold no valid position of any row
    pad = -t % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    n = (t + pad) // chunk
    hs = hidden.reshape(b, n, chunk, d).swapaxes(0, 1)  # [n, B, c, D]
    ts = targets.reshape(b, n, chunk).swapaxes(0, 1)  # [n, B, c]

    @jax.checkpoint
    def chunk_nll(h, tgt):
        logits = logits_fn(h).astype(jnp.float32)  # [B, c, V]
        picked = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]
        return jax.nn.logsumexp(logits, axis=-1) - picked  # [B, c]

    def skip(h, tgt):
        return jnp.zeros(tgt.shape, jnp.float32)

    def body(carry, xs):
        i, h, tgt = xs
        if order is None:
            return carry, chunk_nll(h, tgt)
        return carry, jax.lax.cond(i * chunk < count, chunk_nll, skip, h, tgt)

    _, nll = jax.lax.scan(body, None, (jnp.arange(n), hs, ts))
    nll = nll.swapaxes(0, 1).reshape(b, t + pad)[:, :t]  # [B, T]
    if order is None:
        return nll
    nll = jnp.take_along_axis(nll, jnp.argsort(order, axis=1), axis=1)  # back to the positions
    return jnp.where(valid, nll, 0.0)


def token_mean_loss(nll: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean of `nll` over valid tokens (0 when there are none)."""
    count = valid.sum()
    return jnp.where(valid, nll, 0.0).sum() / jnp.maximum(count, 1)

"""Next-token cross-entropy for CPT and SFT: token mean over labels != -100, packing aware.

Labels follow the Hugging Face convention: `labels[t]` is the token that `logits[t - 1]` predicts
(the shift happens here). In a packed row the first token of a segment is never a target of the
previous segment's last token: a target counts only when it is in the same segment as its input.
The LM head is applied in chunks with its own backward pass (`jax.custom_vjp`: each chunk's logits
recomputed, d nll / d logits = softmax − onehot, the head's gradient summed over chunks in the loop's
carry), so the `[B, T, V]` logits are never materialised whole, no copy of the head is stacked per
chunk for the backward pass, and the head is applied only where a target is: the labelled positions of a
block of rows (the whole batch on one device, each device's rows on a sharded batch) are gathered to
its front and chunks past the largest block's count are skipped, so an SFT batch whose labels cover
20% of the positions pays ~20% of the LM head (rounded up to one chunk).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from pathor1_jax.kernels.policy_loss import CHUNKED_VOCAB_TILE, vocab_tiled_grads, vocab_tiled_logprobs

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
    """Negative log-likelihood `[B, T]` of `targets` under `softmax(hidden @ lm_head)`, `chunk`
    positions per row at a time, `vocab_tile` columns of the head at a time (the whole vocabulary
    when it is larger: one block of logits per chunk). hidden `[B, T, D]`, lm_head `[D, V]`, in the
    dtype the matmul runs in (float32 accumulation and logits).

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
    order = limit = None  # limit: positions of each block to compute (None: all)
    if valid is not None:
        flat_valid = valid.reshape(groups, n_pos)
        order = jnp.argsort(~flat_valid, axis=1, stable=True)  # [G, N]: each block's valid first
        hidden = jnp.take_along_axis(hidden, order[..., None], axis=1)
        targets = jnp.take_along_axis(targets, order, axis=1)
        limit = flat_valid.sum(axis=1).max()  # chunks at or past it hold no valid position of any block
    pad = -n_pos % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    n = (n_pos + pad) // chunk
    hs = hidden.reshape(groups, n, chunk, d).swapaxes(0, 1)  # [n, G, c, D]
    ts = targets.reshape(groups, n, chunk).swapaxes(0, 1)  # [n, G, c]
    nll = _chunked_nll(chunk, vocab_tile, hs, ts, limit, lm_head)  # [n, G, c]
    nll = nll.swapaxes(0, 1).reshape(groups, n_pos + pad)[:, :n_pos]  # [G, N]
    if order is not None:
        nll = jnp.take_along_axis(nll, jnp.argsort(order, axis=1), axis=1)  # back to the positions
    nll = nll.reshape(b, t)
    return nll if valid is None else jnp.where(valid, nll, 0.0)


def _run_chunks(chunk: int, limit, body, skip, carry, xs):
    """`lax.scan` of `body(carry, x)` over the chunks (leading axis of `xs`), `skip` in place of
    `body` for a chunk at or past `limit` positions (None: none skipped)."""

    def step(carry, ix):
        i, x = ix
        if limit is None:
            return body(carry, x)
        return jax.lax.cond(i * chunk < limit, body, skip, carry, x)

    n = jax.tree.leaves(xs)[0].shape[0]
    return jax.lax.scan(step, carry, (jnp.arange(n), xs))


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _chunked_nll(chunk: int, vocab_tile: int, hs, ts, limit, lm_head) -> jax.Array:
    return _chunked_nll_fwd(chunk, vocab_tile, hs, ts, limit, lm_head)[0]


def _chunked_nll_fwd(chunk, vocab_tile, hs, ts, limit, lm_head):
    """Per-chunk NLL `[n, G, c]` and log-sum-exp (the backward pass's only residual besides the
    inputs), the head applied block by block (`vocab_tiled_logprobs`)."""

    def body(_, x):
        h, tgt = x
        logp, lse = vocab_tiled_logprobs(h, lm_head, tgt, vocab_tile)
        return None, (-logp, lse)

    def skip(_, x):
        zeros = jnp.zeros(x[1].shape, jnp.float32)
        return None, (zeros, zeros)

    _, (nll, lse) = _run_chunks(chunk, limit, body, skip, None, (hs, ts))
    return nll, (hs, ts, limit, lse, lm_head)


def _chunked_nll_bwd(chunk, vocab_tile, res, g):
    """Each chunk's logits recomputed block by block (`vocab_tiled_grads`: d nll / d logits =
    softmax − onehot): the hidden states' gradient per chunk, the head's summed over the chunks
    in the loop's carry (float32), never stacked."""
    hs, ts, limit, lse, lm_head = res

    def body(dw, x):
        h, tgt, lse_c, g_c = x
        dh, dw_c = vocab_tiled_grads(h, lm_head, tgt, lse_c, -g_c, vocab_tile)
        return dw + dw_c.astype(jnp.float32), dh

    def skip(dw, x):
        return dw, jnp.zeros_like(x[0])

    zeros = jnp.zeros(lm_head.shape, jnp.float32)
    dw, dhs = _run_chunks(chunk, limit, body, skip, zeros, (hs, ts, lse, g))
    return dhs, None, None, dw.astype(lm_head.dtype)


_chunked_nll.defvjp(_chunked_nll_fwd, _chunked_nll_bwd)


def token_mean_loss(nll: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean of `nll` over valid tokens (0 when there are none)."""
    count = valid.sum()
    return jnp.where(valid, nll, 0.0).sum() / jnp.maximum(count, 1)

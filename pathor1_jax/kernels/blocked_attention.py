"""Block-sparse segment attention in plain JAX: memory O(T · block), never O(T · S).

For self-attention whose segments are contiguous runs much shorter than the sequence (the
Qwen2.5-VL vision tower: windows of ≤ 64 patches, images of a few thousand patches, all patches of a
batch in one sequence), dense attention materialises `[T, T]` logits per head although almost every
entry is masked. Here the sequence is cut into blocks of `block` positions; query block `i` visits
only the key blocks `[lo_i, hi_i)` whose segment-id range meets its own (`block_ranges`), with
the online softmax of flash attention, one key block per step for all query blocks at once (step `r`
gives query block `i` the key block `lo_i + r`, masked once `lo_i + r >= hi_i`). Temporaries per step
are `[B, T / block, H, block, block]`: O(T · block · H), independent of the number of segments.
The step count is the widest range, found at run time (no static bound on a segment's length).

The backward pass (`jax.custom_vjp`) recomputes the probabilities block by block as FlashAttention-2
does: a pass over query blocks for dq and a pass over key blocks (with the same ranges: the
self-attention overlap is symmetric) for dk and dv.

Masking semantics equal `attention.attention_reference` with `segment_ids` (`[B, T]`, T == S, not
causal) for any ids; the sparsity is exploited when equal ids are contiguous (ids need not be
sorted: an id range test is conservative, never wrong).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

# Finite mask value (as the flash kernel): a fully masked block never produces inf - inf.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
# Segment id of positions padded to a whole block; they attend only to each other.
PAD_SEGMENT_ID = int(jnp.iinfo(jnp.int32).min)


def block_ranges(
    q_ids: jax.Array, kv_ids: jax.Array, block_q: int, block_k: int
) -> tuple[jax.Array, jax.Array]:
    """`(lo, hi)` `[B, T / block_q]`: query block `i` (of `block_q` ids of `q_ids` `[B, T]`) may share
    a segment id only with key blocks `lo_i <= j < hi_i` (of `block_k` ids of `kv_ids` `[B, S]`):
    those whose id range `[min, max]` meets its own. T and S are multiples of their blocks.
    For self-attention every block meets itself, so `lo_i <= i < hi_i`."""
    (b, t), s = q_ids.shape, kv_ids.shape[1]
    q_blocks, k_blocks = q_ids.reshape(b, t // block_q, block_q), kv_ids.reshape(b, s // block_k, block_k)
    q_lo, q_hi, k_lo, k_hi = q_blocks.min(-1), q_blocks.max(-1), k_blocks.min(-1), k_blocks.max(-1)
    overlap = (q_lo[:, :, None] <= k_hi[:, None, :]) & (k_lo[:, None, :] <= q_hi[:, :, None])  # [B, nq, nk]
    nk = overlap.shape[-1]
    lo = jnp.argmax(overlap, axis=-1)
    hi = nk - jnp.argmax(overlap[..., ::-1], axis=-1)
    return lo.astype(jnp.int32), hi.astype(jnp.int32)


def _take_blocks(x: jax.Array, index: jax.Array) -> jax.Array:
    """Blocks `x[b, index[b, i]]` for `x` `[B, nb, ...]` and index `[B, nb]`."""
    return jax.vmap(lambda xb, ib: xb[ib])(x, index)


def _step_blocks(lo: jax.Array, hi: jax.Array, r) -> tuple[jax.Array, jax.Array]:
    """The block each block visits at step `r` (clamped) and whether it is in range: `[B, nb]`."""
    j = lo + r
    return jnp.minimum(j, hi - 1), j < hi


def _scores(cfg, q_blk, k_blk, q_seg, k_seg, valid):
    """Scaled logits `[B, nb, K, G, bq, bk]` (f32) of query blocks `[B, nb, bq, K, G, D]` against
    key blocks `[B, nb, bk, K, D]`, and the attend-mask broadcastable to them."""
    s = jnp.einsum("bnqkgd,bnckd->bnkgqc", q_blk, k_blk, preferred_element_type=jnp.float32) * cfg[0]
    mask = (q_seg[:, :, :, None] == k_seg[:, :, None, :]) & valid[:, :, None, None]  # [B, nb, bq, bk]
    return s, mask[:, :, None, None]


def _forward(cfg, q, k, v, seg):
    """Blocked flash forward: `(o, lse)` with q `[B, nb, C, K, G, D]`, k/v `[B, nb, C, K, D]`,
    seg `[B, nb, C]`; o like q, lse `[B, nb, K, G, C]` (f32)."""
    scale, block = cfg
    b, nb, c, kh, g, d = q.shape
    ids = seg.reshape(b, nb * c)
    lo, hi = block_ranges(ids, ids, block, block)
    steps = jnp.max(hi - lo)

    def body(r, carry):
        m, l, acc = carry
        j, valid = _step_blocks(lo, hi, r)
        s, mask = _scores(cfg, q, _take_blocks(k, j), seg, _take_blocks(seg, j), valid)
        s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        alpha = jnp.exp(m - m_new)
        l = alpha * l + p.sum(-1)
        pv = jnp.einsum("bnkgqc,bnckd->bnkgqd", p.astype(v.dtype), _take_blocks(v, j),
                        preferred_element_type=jnp.float32)  # fmt: skip
        return m_new, l, alpha[..., None] * acc + pv

    init = (
        jnp.full((b, nb, kh, g, c), -jnp.inf, jnp.float32),
        jnp.zeros((b, nb, kh, g, c), jnp.float32),
        jnp.zeros((b, nb, kh, g, c, d), jnp.float32),
    )
    m, l, acc = lax.fori_loop(0, steps, body, init)
    o = (acc / l[..., None]).transpose(0, 1, 4, 2, 3, 5).astype(q.dtype)  # [B, nb, C, K, G, D]
    return o, m + jnp.log(l)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _blocked(cfg, q, k, v, seg):
    return _forward(cfg, q, k, v, seg)[0]


def _blocked_fwd(cfg, q, k, v, seg):
    o, lse = _forward(cfg, q, k, v, seg)
    return o, (q, k, v, seg, o, lse)


def _blocked_bwd(cfg, res, do):
    q, k, v, seg, o, lse = res
    scale, block = cfg
    b, nb, c, kh, g, d = q.shape
    ids = seg.reshape(b, nb * c)
    lo, hi = block_ranges(ids, ids, block, block)
    steps = jnp.max(hi - lo)
    # delta = rowsum(dO ∘ O), in the logits' layout [B, nb, K, G, C]
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), -1).transpose(0, 1, 3, 4, 2)

    def probs(s, mask, lse_blk):  # softmax probabilities of (masked) logits, from the saved lse
        return jnp.where(mask, jnp.exp(s - lse_blk[..., None]), 0.0)

    def dq_body(r, dq):  # query block i against key block lo_i + r
        j, valid = _step_blocks(lo, hi, r)
        k_j, v_j = _take_blocks(k, j), _take_blocks(v, j)
        s, mask = _scores(cfg, q, k_j, seg, _take_blocks(seg, j), valid)
        p = probs(s, mask, lse)
        dp = jnp.einsum("bnqkgd,bnckd->bnkgqc", do, v_j, preferred_element_type=jnp.float32)
        ds = p * (dp - delta[..., None])
        return dq + jnp.einsum(
            "bnkgqc,bnckd->bnqkgd", ds.astype(k.dtype), k_j, preferred_element_type=jnp.float32
        )

    dq = lax.fori_loop(0, steps, dq_body, jnp.zeros(q.shape, jnp.float32)) * scale

    def dkv_body(r, carry):  # key block j against query block lo_j + r (the overlap is symmetric)
        dk, dv = carry
        i, valid = _step_blocks(lo, hi, r)
        q_i, do_i = _take_blocks(q, i), _take_blocks(do, i)
        s, mask = _scores(cfg, q_i, k, _take_blocks(seg, i), seg, valid)  # [B, nb(j), K, G, bq, bk]
        p = probs(s, mask, _take_blocks(lse, i))
        dv = dv + jnp.einsum(
            "bnkgqc,bnqkgd->bnckd", p.astype(do.dtype), do_i, preferred_element_type=jnp.float32
        )
        dp = jnp.einsum("bnqkgd,bnckd->bnkgqc", do_i, v, preferred_element_type=jnp.float32)
        ds = p * (dp - _take_blocks(delta, i)[..., None])
        dk = dk + jnp.einsum(
            "bnkgqc,bnqkgd->bnckd", ds.astype(q.dtype), q_i, preferred_element_type=jnp.float32
        )
        return dk, dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, steps, dkv_body, (zeros, zeros))
    return dq.astype(q.dtype), (dk * scale).astype(k.dtype), dv.astype(v.dtype), None


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


def blocked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    *,
    block: int = 64,
    sm_scale: float | None = None,
) -> jax.Array:
    """Segment-masked self-attention computed block by block (module doc).

    q: `[B, T, H, D]`, k/v: `[B, T, K, D]` with `H % K == 0`; segment_ids `[B, T]` (a query attends to
    the keys with its id). T is padded to a multiple of `block` inside. Returns `[B, T, H, D]` in q's
    dtype, equal to `attention_reference(q, k, v, segment_ids=segment_ids)`.
    """
    b, t, h, d = q.shape
    kh = k.shape[2]
    if k.shape != v.shape or k.shape[:2] != (b, t) or k.shape[3] != d:
        raise ValueError(f"blocked_attention: k {k.shape} / v {v.shape} do not match q {q.shape} (T == S)")
    if h % kh:
        raise ValueError(f"blocked_attention: {h} query heads are not a multiple of {kh} kv heads")
    if segment_ids.shape != (b, t):
        raise ValueError(f"blocked_attention: segment_ids {segment_ids.shape}, expected {(b, t)}")
    nb = -(-t // block)
    pad = nb * block - t
    seg = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, pad)), constant_values=PAD_SEGMENT_ID)

    q_blk = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, nb, block, kh, h // kh, d)
    k_blk = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, nb, block, kh, d)
    v_blk = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, nb, block, kh, d)
    scale = d**-0.5 if sm_scale is None else float(sm_scale)
    o = _blocked((scale, block), q_blk, k_blk, v_blk, seg.reshape(b, nb, block))
    return o.reshape(b, nb * block, h, d)[:, :t]

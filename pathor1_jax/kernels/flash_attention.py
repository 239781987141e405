"""Flash attention in Pallas (FlashAttention-2 schedule), forward and backward.

One kernel body serves two backends: Mosaic TPU (`backend="tpu"`) and Triton GPU (`backend="gpu"`);
both run on CPU with `interpret=True`. Each program owns one (batch, head, block) tile and walks the
other sequence axis in a `fori_loop`, so the whole key/value (or query) row of one head is the block.

Layout inside the kernels is `[B, H, T, D]`; `flash_attention` takes and returns the public
`[B, T, H, D]` layout. Lengths that are not a multiple of the block are padded inside the wrapper:
padded keys get a segment id no query holds, padded queries get the id of key 0 (so no row is ever
fully masked) and are sliced off, so the result equals the unpadded computation.

Backward (`jax.custom_vjp`): `delta = rowsum(dO * O)` in XLA, then a dq kernel (programs over query
blocks, loop over key blocks) and a dk/dv kernel (programs over key blocks and *query* heads, loop
over query blocks, computing the transposed scores `K Q^T` so every matmul is NN or NT); per-query-
head dk/dv are summed over each GQA group in XLA.

Mosaic-friendly layouts: in-kernel dynamic slices index only the second-minor (sublane) axis; a
per-query value that the dk/dv kernel needs along lanes (log-sum-exp, delta, query segment ids) is
passed as `[..., T / block_q, block_q]` rows, key segment ids as `[B, S / block_k, block_k]` rows
for the forward and dq kernels and as a `[B, S, 1]` column for the dk/dv kernel.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from pathor1_jax.kernels.blocked_attention import PAD_SEGMENT_ID, block_ranges

# Finite mask value: a fully masked tile never produces inf - inf.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

_NT = (((1,), (1,)), ((), ()))  # a @ b.T


class _Config(NamedTuple):
    scale: float
    causal: bool
    offset: int  # query row r sits at key position r + offset (offset = S - T, unpadded)
    block_q: int
    block_k: int
    has_segments: bool
    backend: str
    interpret: bool
    vmem_limit: int | None  # TPU scoped-VMEM limit (bytes); None = Mosaic's default
    block_sparse: bool  # loops visit only the blocks of `key_block_ranges` (range refs in SMEM)


def _compiler_params(cfg: _Config, n_grid: int):
    if cfg.backend == "tpu":
        return pltpu.CompilerParams(
            dimension_semantics=("parallel",) * n_grid, vmem_limit_bytes=cfg.vmem_limit
        )
    return pltriton.CompilerParams(num_warps=4, num_stages=2)


def tpu_vmem_bytes(q_len: int, kv_len: int, head_dim: int, itemsize: int) -> int:
    """Estimated VMEM of the TPU kernels: two double-buffered whole-row operands (K and V, or Q and
    dO) of one head, their last dim padded to VMEM's 128 lanes (head dim 80 takes 128), plus 4 MiB
    for tiles, f32 temporaries and segment ids."""
    lanes = -(-head_dim // 128) * 128
    return 2 * 2 * max(q_len, kv_len) * lanes * itemsize + 4 * 2**20


def _mask(cfg: _Config, seg_eq, q_pos, k_pos):
    """Boolean attend-mask from segment equality and positions (broadcast together), or None."""
    mask = seg_eq if cfg.has_segments else None
    if cfg.causal:
        causal = k_pos <= q_pos + cfg.offset
        mask = causal if mask is None else mask & causal
    return mask


def _iota(shape, dim: int):
    return lax.broadcasted_iota(jnp.int32, shape, dim)


def _num_kv_blocks(cfg: _Config, q_block, num_k_blocks: int):
    """Key blocks a query block can see: all, or (causal) up to its last row's position."""
    if not cfg.causal:
        return num_k_blocks
    last_pos = (q_block + 1) * cfg.block_q - 1 + cfg.offset
    return jnp.clip(last_pos // cfg.block_k + 1, 1, num_k_blocks)


def _first_q_block(cfg: _Config, k_block, num_q_blocks: int):
    """First query block that can see a key block (0 unless causal)."""
    if not cfg.causal:
        return 0
    return jnp.clip((k_block * cfg.block_k - cfg.offset) // cfg.block_q, 0, num_q_blocks)


def _n_inputs(cfg: _Config, n: int) -> int:
    """Kernel inputs: `n` arrays, then two segment-id refs and two block-range refs when used."""
    return n + 2 * cfg.has_segments + 2 * cfg.block_sparse


def _split_refs(refs, cfg: _Config, n_in: int):
    """(inputs without segment/range refs, q_seg_ref, kv_seg_ref, outputs, (lo_ref, hi_ref))."""
    ins, outs = refs[:n_in], refs[n_in:]
    ranges = (None, None)
    if cfg.block_sparse:
        ins, ranges = ins[:-2], ins[-2:]
    if cfg.has_segments:
        return ins[:-2], ins[-2], ins[-1], outs, ranges
    return ins, None, None, outs, ranges


def _block_range(ranges, block):
    """`(lo, hi)`: the blocks the inner loop of this program's `block` visits (block-sparse; read from
    the SMEM range refs at this program's batch row)."""
    lo_ref, hi_ref = ranges
    b = pl.program_id(0)
    return lo_ref[b, block], hi_ref[b, block]


# ----------------------------------------------------------------------------------------- forward


def _fwd_kernel(*refs, cfg: _Config, num_k_blocks: int):
    (q_ref, k_ref, v_ref), q_seg_ref, kv_seg_ref, (o_ref, lse_ref), ranges = _split_refs(
        refs, cfg, _n_inputs(cfg, 3)
    )
    bq, bk = cfg.block_q, cfg.block_k
    i = pl.program_id(2)
    q = q_ref[...]  # [bq, D]
    q_seg = q_seg_ref[...] if cfg.has_segments else None  # [bq, 1]

    def body(j, carry):
        m, l, acc = carry
        start = pl.multiple_of(j * bk, bk)
        k = k_ref[pl.ds(start, bk), :]  # [bk, D]
        v = v_ref[pl.ds(start, bk), :]
        s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * cfg.scale  # [bq, bk]
        seg_eq = q_seg == kv_seg_ref[pl.ds(j, 1), :] if cfg.has_segments else None  # [bq, 1] == [1, bk]
        mask = _mask(cfg, seg_eq, i * bq + _iota(s.shape, 0), start + _iota(s.shape, 1))
        if mask is not None:
            s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=-1, keepdims=True))
        p = jnp.exp(s - m_new)
        alpha = jnp.exp(m - m_new)
        l = alpha * l + p.sum(axis=-1, keepdims=True)
        acc = alpha * acc + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return m_new, l, acc

    init = (
        jnp.full((bq, 1), -jnp.inf, jnp.float32),
        jnp.zeros((bq, 1), jnp.float32),
        jnp.zeros(q.shape, jnp.float32),
    )
    start, end = _block_range(ranges, i) if cfg.block_sparse else (0, _num_kv_blocks(cfg, i, num_k_blocks))
    m, l, acc = lax.fori_loop(start, end, body, init)
    o_ref[...] = (acc / l).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def _seg_inputs(cfg: _Config, q_seg, kv_seg, q_blocks: bool):
    """Segment-id arrays and BlockSpecs from `[B, Tp]` / `[B, Sp]` ids (free reshapes).

    q_blocks (forward, dq): a `[bq, 1]` column of query ids and all key ids as `[Sp / bk, bk]` rows;
    otherwise (dk/dv): all query ids as `[Tp / bq, bq]` rows and a `[bk, 1]` column of key ids.
    """
    if not cfg.has_segments:
        return [], []
    (b, t), s = q_seg.shape, kv_seg.shape[1]
    bq, bk = cfg.block_q, cfg.block_k
    if q_blocks:
        arrays = [q_seg.reshape(b, t, 1), kv_seg.reshape(b, s // bk, bk)]
        specs = [
            pl.BlockSpec((None, bq, 1), lambda b, h, i: (b, i, 0)),
            pl.BlockSpec((None, s // bk, bk), lambda b, h, i: (b, 0, 0)),
        ]
    else:
        arrays = [q_seg.reshape(b, t // bq, bq), kv_seg.reshape(b, s, 1)]
        specs = [
            pl.BlockSpec((None, t // bq, bq), lambda b, h, j: (b, 0, 0)),
            pl.BlockSpec((None, bk, 1), lambda b, h, j: (b, j, 0)),
        ]
    return arrays, specs


def _range_inputs(cfg: _Config, q_seg, kv_seg, per_q_block: bool):
    """Block-range arrays `(lo, hi)` `[B, blocks]` and their whole-array SMEM specs (block-sparse):
    per query block the key blocks it visits (forward, dq), else per key block the query blocks."""
    if not cfg.block_sparse:
        return [], []
    lo, hi = block_ranges(q_seg, kv_seg, cfg.block_q, cfg.block_k)
    if not per_q_block:
        lo, hi = block_ranges(kv_seg, q_seg, cfg.block_k, cfg.block_q)
    memory = pltpu.SMEM if cfg.backend == "tpu" else None
    return [lo, hi], [pl.BlockSpec(memory_space=memory)] * 2


def _fwd(cfg: _Config, q, k, v, q_seg, kv_seg):
    b, h, t, d = q.shape
    kv_heads, s = k.shape[1], k.shape[2]
    groups = h // kv_heads
    grid = (b, h, t // cfg.block_q)
    q_spec = pl.BlockSpec((None, None, cfg.block_q, d), lambda b, h, i: (b, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, s, d), lambda b, h, i: (b, h // groups, 0, 0))
    row_spec = pl.BlockSpec((None, None, cfg.block_q, 1), lambda b, h, i: (b, h, i, 0))
    seg_arrays, seg_specs = _seg_inputs(cfg, q_seg, kv_seg, q_blocks=True)
    range_arrays, range_specs = _range_inputs(cfg, q_seg, kv_seg, per_q_block=True)
    o, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, num_k_blocks=s // cfg.block_k),
        grid=grid,
        in_specs=[q_spec, kv_spec, kv_spec, *seg_specs, *range_specs],
        out_specs=[q_spec, row_spec],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, t, 1), jnp.float32)],
        compiler_params=_compiler_params(cfg, len(grid)),
        interpret=cfg.interpret,
        name="flash_attention_fwd",
    )(q, k, v, *seg_arrays, *range_arrays)
    return o, lse


# ---------------------------------------------------------------------------------------- backward


def _dq_kernel(*refs, cfg: _Config, num_k_blocks: int):
    ins, q_seg_ref, kv_seg_ref, (dq_ref,), ranges = _split_refs(refs, cfg, _n_inputs(cfg, 6))
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = ins
    bq, bk = cfg.block_q, cfg.block_k
    i = pl.program_id(2)
    q, do = q_ref[...], do_ref[...]  # [bq, D]
    lse, delta = lse_ref[...], delta_ref[...]  # [bq, 1]
    q_seg = q_seg_ref[...] if cfg.has_segments else None

    def body(j, dq):
        start = pl.multiple_of(j * bk, bk)
        k = k_ref[pl.ds(start, bk), :]
        v = v_ref[pl.ds(start, bk), :]
        s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * cfg.scale
        p = jnp.exp(s - lse)  # [bq, bk]
        seg_eq = q_seg == kv_seg_ref[pl.ds(j, 1), :] if cfg.has_segments else None
        mask = _mask(cfg, seg_eq, i * bq + _iota(s.shape, 0), start + _iota(s.shape, 1))
        if mask is not None:
            p = jnp.where(mask, p, 0.0)
        dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - delta)
        return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    start, end = _block_range(ranges, i) if cfg.block_sparse else (0, _num_kv_blocks(cfg, i, num_k_blocks))
    dq = lax.fori_loop(start, end, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, cfg: _Config, num_q_blocks: int):
    ins, q_seg_ref, kv_seg_ref, (dk_ref, dv_ref), ranges = _split_refs(refs, cfg, _n_inputs(cfg, 6))
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = ins
    bq, bk = cfg.block_q, cfg.block_k
    j = pl.program_id(2)
    k, v = k_ref[...], v_ref[...]  # [bk, D]
    kv_seg = kv_seg_ref[...] if cfg.has_segments else None  # [bk, 1]

    def body(i, carry):
        dk, dv = carry
        start = pl.multiple_of(i * bq, bq)
        q = q_ref[pl.ds(start, bq), :]  # [bq, D]
        do = do_ref[pl.ds(start, bq), :]
        lse = lse_ref[pl.ds(i, 1), :]  # [1, bq]
        delta = delta_ref[pl.ds(i, 1), :]
        s_t = lax.dot_general(k, q, _NT, preferred_element_type=jnp.float32) * cfg.scale  # [bk, bq]
        p_t = jnp.exp(s_t - lse)
        seg_eq = kv_seg == q_seg_ref[pl.ds(i, 1), :] if cfg.has_segments else None  # [bk, 1] == [1, bq]
        mask = _mask(cfg, seg_eq, start + _iota(s_t.shape, 1), j * bk + _iota(s_t.shape, 0))
        if mask is not None:
            p_t = jnp.where(mask, p_t, 0.0)
        dv = dv + jnp.dot(p_t.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dp_t = lax.dot_general(v, do, _NT, preferred_element_type=jnp.float32)  # [bk, bq]
        ds_t = p_t * (dp_t - delta)
        dk = dk + jnp.dot(ds_t.astype(q.dtype), q, preferred_element_type=jnp.float32)
        return dk, dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    start, end = (
        _block_range(ranges, j) if cfg.block_sparse else (_first_q_block(cfg, j, num_q_blocks), num_q_blocks)
    )
    dk, dv = lax.fori_loop(start, end, body, (zeros, zeros))
    dk_ref[...] = dk * cfg.scale
    dv_ref[...] = dv


def _bwd_kernels(cfg: _Config, q, k, v, q_seg, kv_seg, lse, do, delta):
    b, h, t, d = q.shape
    kv_heads, s = k.shape[1], k.shape[2]
    groups = h // kv_heads
    nq = t // cfg.block_q

    grid = (b, h, t // cfg.block_q)
    q_spec = pl.BlockSpec((None, None, cfg.block_q, d), lambda b, h, i: (b, h, i, 0))
    row_spec = pl.BlockSpec((None, None, cfg.block_q, 1), lambda b, h, i: (b, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, s, d), lambda b, h, i: (b, h // groups, 0, 0))
    seg_arrays, seg_specs = _seg_inputs(cfg, q_seg, kv_seg, q_blocks=True)
    range_arrays, range_specs = _range_inputs(cfg, q_seg, kv_seg, per_q_block=True)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, num_k_blocks=s // cfg.block_k),
        grid=grid,
        in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, *seg_specs, *range_specs],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_compiler_params(cfg, len(grid)),
        interpret=cfg.interpret,
        name="flash_attention_dq",
    )(q, k, v, do, lse, delta, *seg_arrays, *range_arrays)

    grid = (b, h, s // cfg.block_k)
    q_all = pl.BlockSpec((None, None, t, d), lambda b, h, j: (b, h, 0, 0))
    rows_all = pl.BlockSpec((None, None, nq, cfg.block_q), lambda b, h, j: (b, h, 0, 0))
    kv_block = pl.BlockSpec((None, None, cfg.block_k, d), lambda b, h, j: (b, h // groups, j, 0))
    dkv_block = pl.BlockSpec((None, None, cfg.block_k, d), lambda b, h, j: (b, h, j, 0))
    seg_arrays, seg_specs = _seg_inputs(cfg, q_seg, kv_seg, q_blocks=False)
    range_arrays, range_specs = _range_inputs(cfg, q_seg, kv_seg, per_q_block=False)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, num_q_blocks=t // cfg.block_q),
        grid=grid,
        in_specs=[q_all, kv_block, kv_block, q_all, rows_all, rows_all, *seg_specs, *range_specs],
        out_specs=[dkv_block, dkv_block],
        out_shape=[jax.ShapeDtypeStruct((b, h, s, d), jnp.float32)] * 2,
        compiler_params=_compiler_params(cfg, len(grid)),
        interpret=cfg.interpret,
        name="flash_attention_dkv",
    )(
        q, k, v, do, lse.reshape(b, h, nq, cfg.block_q), delta.reshape(b, h, nq, cfg.block_q),
        *seg_arrays, *range_arrays,
    )  # fmt: skip
    # Per-query-head dk/dv -> sum over each GQA group.
    dk = dk.reshape(b, kv_heads, groups, s, d).sum(axis=2).astype(k.dtype)
    dv = dv.reshape(b, kv_heads, groups, s, d).sum(axis=2).astype(v.dtype)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg: _Config, q, k, v, q_seg, kv_seg):
    return _fwd(cfg, q, k, v, q_seg, kv_seg)[0]


def _flash_fwd(cfg: _Config, q, k, v, q_seg, kv_seg):
    o, lse = _fwd(cfg, q, k, v, q_seg, kv_seg)
    return o, (q, k, v, q_seg, kv_seg, o, lse)


def _flash_bwd(cfg: _Config, res, do):
    q, k, v, q_seg, kv_seg, o, lse = res
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1, keepdims=True)  # [B, H, T, 1]
    dq, dk, dv = _bwd_kernels(cfg, q, k, v, q_seg, kv_seg, lse, do, delta)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------------------- wrapper


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
    causal: bool = False,
    sm_scale: float | None = None,
    backend: str = "tpu",
    block_q: int = 128,
    block_k: int = 128,
    interpret: bool = False,
    block_sparse: bool = False,
) -> jax.Array:
    """Pallas flash attention with the semantics of `attention.attention_reference`.

    q: `[B, T, H, D]`, k/v: `[B, S, K, D]` (`H % K == 0`); segment_ids `[B, T]` (needs T == S) or a
    pair (`[B, T]`, `[B, S]`); backend "tpu" (Mosaic) or "gpu" (Triton); `interpret=True` runs the
    kernels with the Pallas interpreter (CPU). Returns `[B, T, H, D]` in q's dtype.

    block_sparse (self-attention, not causal): each inner loop visits only the blocks whose
    segment-id range meets its own block's (`blocked_attention.block_ranges`), so short contiguous
    segments (vision windows, images) cost O(T · segment) instead of O(T²); exact for any ids.
    """
    b, t, h, d = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"flash_attention: k {k.shape} / v {v.shape} do not match q {q.shape}")
    if h % kv_heads:
        raise ValueError(f"flash_attention: {h} query heads are not a multiple of {kv_heads} kv heads")
    if backend not in ("tpu", "gpu"):
        raise ValueError(f"flash_attention: unknown backend {backend!r}; expected 'tpu' or 'gpu'")
    if segment_ids is not None and not isinstance(segment_ids, tuple):
        if t != s:
            raise ValueError(f"flash_attention: self segment_ids need T == S, got T={t}, S={s}")
        segment_ids = (segment_ids, segment_ids)
    if segment_ids is not None and (segment_ids[0].shape != (b, t) or segment_ids[1].shape != (b, s)):
        raise ValueError(
            f"flash_attention: segment_ids {segment_ids[0].shape}/{segment_ids[1].shape}, "
            f"expected {(b, t)}/{(b, s)}"
        )
    if block_sparse and (causal or segment_ids is None or t != s):
        raise ValueError("flash_attention: block_sparse needs self-attention segment_ids and causal=False")
    tp, sp = _round_up(t, block_q), _round_up(s, block_k)
    has_segments = segment_ids is not None or tp != t or sp != s
    vmem = tpu_vmem_bytes(tp, sp, d, q.dtype.itemsize)
    # Above ~12 MiB raise Mosaic's scoped-VMEM limit (default 16 MiB on v5e) with 16 MiB of headroom.
    vmem_limit = vmem + 16 * 2**20 if backend == "tpu" and vmem > 12 * 2**20 else None
    cfg = _Config(
        scale=d**-0.5 if sm_scale is None else float(sm_scale),
        causal=causal,
        offset=s - t,
        block_q=block_q,
        block_k=block_k,
        has_segments=has_segments,
        backend=backend,
        interpret=interpret,
        vmem_limit=vmem_limit,
        block_sparse=block_sparse,
    )
    q_seg = kv_seg = None
    if has_segments:
        if segment_ids is None:
            segment_ids = (jnp.zeros((b, t), jnp.int32), jnp.zeros((b, s), jnp.int32))
        q_seg, kv_seg = (x.astype(jnp.int32) for x in segment_ids)
        # Padded queries see key 0 (a real key: never a fully masked row); padded keys match nothing
        # but, block-sparse (T == S), the padded queries, which then stay in their own block.
        q_pad = jnp.broadcast_to(kv_seg[:, :1], (b, tp - t))
        if block_sparse:
            q_pad = jnp.full((b, tp - t), PAD_SEGMENT_ID, jnp.int32)
        q_seg = jnp.concatenate([q_seg, q_pad], axis=1)  # [B, Tp]
        kv_seg = jnp.pad(kv_seg, ((0, 0), (0, sp - s)), constant_values=PAD_SEGMENT_ID)  # [B, Sp]

    def to_kernel(x, n, n_pad):  # [B, N, heads, D] -> [B, heads, N_pad, D]
        return jnp.pad(x, ((0, 0), (0, n_pad - n), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    o = _flash(cfg, to_kernel(q, t, tp), to_kernel(k, s, sp), to_kernel(v, s, sp), q_seg, kv_seg)
    return o[:, :, :t].transpose(0, 2, 1, 3)

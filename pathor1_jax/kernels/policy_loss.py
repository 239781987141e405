"""Fused clipped policy-gradient loss (GRPO / DAPO, Patho-R1 section 3.4) without a `[B, T, V]` tensor.

The expensive part of the loss is the per-token log-probability of the sampled token,
`logp[b, t] = h[b, t] . W[:, y] - logsumexp_v(h[b, t] . W[:, v])`, over Qwen2.5-VL's 151,936-token
vocabulary. `token_logprobs` computes it tile by tile over the vocabulary with an online
log-sum-exp (forward) and recomputes the tiles in the backward pass (`jax.custom_vjp`):
`dlogits = g * (onehot(y) - softmax)` per tile, `dh += dlogits @ W_tile.T`, `dW_tile = h.T @ dlogits`.
Only `[B, T]` vectors and one `[rows, tile]` block of logits exist at a time.

The clipped surrogate itself is elementwise on `[B, T]` and shared by every implementation:

    ratio_t = exp(logp_t - old_t)
    surrogate_t = min(ratio_t * A, clip(ratio_t, 1 - eps_low, 1 + eps_high) * A)
    surrogate_t = max(surrogate_t, dual_clip * A)   where A < 0, only with a dual clip (verl, > 1)
    objective_t = surrogate_t - beta * KL_t
    KL_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1          (k3 estimator; 0 without ref)
    loss = -aggregate(objective_t over response tokens)           (minimise the loss)

Aggregation (`AGG_MODES`): "token-mean" sums over every response token of the batch and divides by
the number of response tokens (verl's token-mean, its DAPO recipe); "seq-mean-token-mean" (GRPO
Eq. 1) takes each sequence's token mean, then the mean over sequences that have at least one
response token; "group-mean-token-mean" (DAPO Eq. 2 as written) takes each group's token mean over
its `group_size` consecutive sequences, then the mean over groups that have a response token.

Temperature: `logp` is the log-probability under softmax(logits / T), the distribution that sampling
at temperature T draws from (as verl and EasyR1 compute it). The wrappers divide the hidden states by
T once, before any implementation runs, so every implementation (and its gradient) sees it the same.

Metrics (token means over response tokens): `clip_fraction` (tokens where the clipped term is the
smaller one, i.e. clipping removes the gradient), `mean_ratio`, `kl` (k3; 0 without ref).

Implementations (`impl`): "xla" (reference: materialises the float32 logits), "chunked" (plain
JAX loop over vocabulary tiles, custom_vjp), "pallas" (Mosaic TPU kernels; CPU needs
`PATHOR1_PALLAS_INTERPRET=1`), "auto" (pallas when the target is a TPU — the devices of the mesh in
context, abstract ones included, else JAX's backend — chunked elsewhere). Given a `valid` mask (the
response tokens), chunked computes only those positions (`gathered_logprobs`: gathered to the front,
in row chunks, a chunk past the last valid position skipped), as the CPT/SFT cross-entropy does.

Pallas kernels: a forward kernel (online log-sum-exp and the token's logit per row block), a dh
kernel (rows parallel, vocabulary accumulated) and a dW kernel (vocabulary parallel, rows
accumulated), called over `PALLAS_VOCAB_CHUNK`-column chunks of the head (statistics merged and dh
summed between chunks in XLA). Every chunk has one shape, so each kernel is compiled once: the last
chunk ends at the last column and its first `lo` columns, which repeat the previous chunk's, are
masked (logits set to MASK_VALUE by comparing the column with `lo`, a scalar-prefetch argument;
the token ids of those columns are -1). No weight tile is ever masked or padded — a masked bf16
weight tile is what Mosaic cannot lay out, and Qwen's 151,936 columns are no multiple of a wide
tile. `hidden` is cast to the matmul dtype of (hidden, lm_head) first, as the reference's einsum
promotes it. Tiles are chosen per chip, head dtype and model width by `pallas_tiles` (see there)
so every buffer fits the chip's scoped VMEM.

Under `logical.use_rules(mesh, rules)` the Pallas path runs per shard in `shard_map` (a
Mosaic kernel is opaque to XLA's partitioner): rows split as the rules split "batch"; each chunk
of the head all-gathered over the mesh axes that split "embed" (when they are among the row axes;
otherwise the head is gathered at the boundary) and its dW reduce-scattered back over them and
summed over the other row axes, so no device ever holds the whole head or its gradient; the
vocabulary split as the rules split "vocab" when that is a different mesh axis (Megatron's
vocab-parallel cross-entropy: each shard holds `V / n` columns, the row statistics are combined
with a `pmax`/`psum` of `[rows]` vectors and dh is summed over the vocabulary shards), whole
otherwise, so no device repeats another's work.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import Mesh, PartitionSpec

from pathor1_jax import logical
from pathor1_jax.kernels.attention import pallas_interpret
from pathor1_jax.kernels.flash_attention import MASK_VALUE
from pathor1_jax.kernels.platform import note_impl, target_device_kind, target_platform
from pathor1_jax.logical import axis_names

AGG_MODES = ("token-mean", "seq-mean-token-mean", "group-mean-token-mean")
IMPLS = ("auto", "xla", "chunked", "pallas")
CHUNKED_VOCAB_TILE = 8192  # chunked XLA: every row at once, 8192 vocabulary columns per step
# chunked XLA with a `valid` mask: positions per row of a chunk of gathered valid positions (a GRPO
# mini-batch of 8 rows: 64 positions, so a 48-token response budget half used pays ~half the head)
GATHERED_ROW_CHUNK = 8
# Pallas: the kernels run over chunks of this many head columns (rounded to the tiles), each
# all-gathered over the mesh axes that split the head's model dimension, and dW is
# reduce-scattered chunk by chunk: per-device memory holds one chunk of W and dW, not the head.
PALLAS_VOCAB_CHUNK = 8192

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


# ------------------------------------------------------------------------------- tiles per chip


class Tiles(NamedTuple):
    """Pallas block sizes: `rows` x `vocab` for the forward and dh kernels (grid rows x vocabulary),
    `dw_rows` x `dw_vocab` for the dW kernel (grid vocabulary x rows), and each kernel's Mosaic
    scoped-VMEM limit in bytes (`vmem_limits` = fwd, dh, dW; None keeps the chip's default)."""

    rows: int
    vocab: int
    dw_rows: int
    dw_vocab: int
    vmem_limits: tuple[int | None, int | None, int | None] = (None, None, None)


class _Chip(NamedTuple):
    scoped_vmem: int  # Mosaic's default scoped-VMEM limit (bytes), as libtpu 0.0.42.1 reports it
    vmem: int  # VMEM per TensorCore (bytes)
    ridge: float  # peak bf16 FLOP/s over HBM bytes/s: the FLOPs per byte that make a kernel compute-bound


@functools.cache
def _chips() -> dict[str, _Chip]:
    def chip(version, scoped_mib: int) -> _Chip:
        info = pltpu.get_tpu_info_for_chip(version, 1)
        ridge = info.bf16_ops_per_second / info.mem_bw_bytes_per_second
        return _Chip(scoped_mib * 2**20, info.vmem_capacity_bytes, ridge)

    v = pltpu.ChipVersion
    return {"v5e": chip(v.TPU_V5E, 16), "v5p": chip(v.TPU_V5P, 16), "v6e": chip(v.TPU_V6E, 32)}


# device_kind (as TPU devices, abstract ones included, report it) -> chip
_DEVICE_KINDS = {
    "TPU v5 lite": "v5e",
    "TPU v5e": "v5e",
    "TPU v5": "v5p",
    "TPU v5p": "v5p",
    "TPU v6 lite": "v6e",
    "TPU v6e": "v6e",
}
DEFAULT_CHIP = "v5e"  # tiles for TPUs not in the table and for interpret mode
_KERNELS = ("fwd", "dh", "dw")


def vmem_bytes(kernel: str, rows: int, cols: int, d: int, h_itemsize: int, w_itemsize: int) -> int:
    """Scoped VMEM (bytes) one kernel ("fwd", "dh", "dw") needs at a `rows x cols` block.

    Pipelined blocks: hidden `[rows, d]` and the float32 dh `[rows, d]` are single-buffered in
    fwd/dh (they change once per row of the grid), double-buffered in dW; W `[d, cols]` and the
    float32 dW `[d, cols]` are double-buffered. Values Mosaic keeps in VMEM: two float32
    `[rows, cols]` arrays (the logits and their exponentials), the loaded hidden `[rows, d]`, in
    dh the float32 `[rows, d]` product, and 512 KiB for the `[rows, 1]` columns and Mosaic's
    internal scratch. This bounds what libtpu 0.0.42.1 reports for all three kernels on v5e, v5p
    and v6e (rows 256-1024, cols 512-1024, d 256 and 2048; its model of those values is not
    published, so they were measured by bisecting `vmem_limit_bytes`).
    """
    h_block = rows * d * h_itemsize
    blocks = {
        "fwd": h_block + 2 * d * cols * w_itemsize,
        "dh": h_block + 2 * d * cols * w_itemsize + rows * d * 4,
        "dw": 2 * h_block + 2 * d * cols * w_itemsize + 2 * d * cols * 4,
    }[kernel]
    values = 2 * rows * cols * 4 + h_block + (rows * d * 4 if kernel == "dh" else 0) + 2**19
    return blocks + values


def _pow2_at_least(x: float, lo: int, hi: int) -> int:
    return min(hi, max(lo, 1 << max(0, math.ceil(math.log2(x)))))


def pallas_tiles(chip: str, d: int, h_dtype, w_dtype) -> Tiles:
    """The Pallas tiles for `chip` ("v5e", "v5p", "v6e"), model width `d` and the dtypes of the
    hidden states and the head (hidden is promoted to the matmul dtype first).

    The forward and dh kernels stream W from HBM once per block of rows, doing `2 * rows` FLOPs
    per W element: `rows` is the smallest power of two (128-1024) giving twice the chip's ridge
    point (peak FLOP/s / HBM bytes/s) per W byte. The dW kernel streams the hidden states once per
    vocabulary block, so its `dw_vocab` follows the same rule with the hidden itemsize. The other
    dimension is 1024 or 512 (narrower blocks spend >10% of a step on the grid's per-step
    overhead) when its `vmem_bytes` fits the chip's default scoped VMEM. Otherwise the kernel's
    limit is raised to the need of the widest of 512, 256, 128 that fits in half the chip's VMEM,
    plus 25% (justified: a smaller streamed tile would re-read its operand from HBM more often
    than the chip can feed it); only past that is the streamed dimension halved.
    """
    info = _chips()[chip]
    hs = jnp.promote_types(h_dtype, w_dtype).itemsize
    ws = jnp.dtype(w_dtype).itemsize

    def choose(kernels: tuple[str, ...], target: int):
        """(streamed, other, limits) of kernels sharing one tile; the streamed dimension (reused
        across the grid's inner axis) is rows for fwd/dh and vocab for dW."""

        def need(streamed: int, other: int) -> list[int]:
            shape = (streamed, other) if kernels[0] != "dw" else (other, streamed)
            return [vmem_bytes(k, *shape, d, hs, ws) for k in kernels]

        streamed = target
        while streamed >= 128:
            for other in (1024, 512):
                if max(need(streamed, other)) <= info.scoped_vmem:
                    return streamed, other, [None] * len(kernels)
            for other in (512, 256, 128):
                limits = [-(-n * 5 // 4 // 2**20) * 2**20 for n in need(streamed, other)]
                if max(limits) <= info.vmem // 2:
                    return streamed, other, [lim if lim > info.scoped_vmem else None for lim in limits]
            streamed //= 2
        head = jnp.dtype(w_dtype).name
        raise ValueError(f"policy loss: no Pallas tiles fit {chip} VMEM at d={d} ({head} head)")

    rows, vocab, (fwd_limit, dh_limit) = choose(("fwd", "dh"), _pow2_at_least(info.ridge * ws, 128, 1024))
    dw_vocab, dw_rows, (dw_limit,) = choose(("dw",), _pow2_at_least(info.ridge * hs, 128, 1024))
    return Tiles(rows, vocab, dw_rows, dw_vocab, (fwd_limit, dh_limit, dw_limit))


# ------------------------------------------------------------------------------- per-tile math
# A tile is `[D, bv]` columns of a chunk; `col0` is its first column and `lo` the chunk's first
# valid column (columns below it belong to the previous chunk: the last chunk overlaps it), both
# relative to the chunk, as are the tokens (-1 where the token is not in the valid columns).


def _tile_logits(h, w, col0, lo):
    """Float32 logits `[n, bv]` (columns below `lo` set to MASK_VALUE) and their column ids."""
    logits = jnp.dot(h, w, preferred_element_type=jnp.float32)
    col = col0 + lax.broadcasted_iota(jnp.int32, logits.shape, 1)
    return jnp.where(col >= lo, logits, MASK_VALUE), col


def _tile_stats(h, w, tokens, col0, lo, carry):
    """Online log-sum-exp update with one tile: carry (running max, running sum, token logit),
    each `[n, 1]` float32; h `[n, D]`, w `[D, bv]`, tokens `[n, 1]`."""
    m, l, tok = carry
    logits, col = _tile_logits(h, w, col0, lo)
    tok = tok + jnp.sum(jnp.where(col == tokens, logits, 0.0), axis=-1, keepdims=True)
    m_new = jnp.maximum(m, logits.max(axis=-1, keepdims=True))
    l = l * jnp.exp(m - m_new) + jnp.exp(logits - m_new).sum(axis=-1, keepdims=True)
    return m_new, l, tok


def _tile_dlogits(h, w, tokens, lse, g, col0, lo):
    """`g * (onehot(y) - softmax)` `[n, bv]` (float32) of one tile (0 below `lo`)."""
    logits, col = _tile_logits(h, w, col0, lo)
    return g * ((col == tokens).astype(jnp.float32) - jnp.exp(logits - lse))


def _tile_grads(h, w, tokens, lse, g, lo):
    """dh `[n, D]` and dW `[D, bv]` (float32) of one plain-XLA tile (the chunked impl's chunk)."""
    dlogits = _tile_dlogits(h, w, tokens, lse, g, 0, lo)
    dh = lax.dot_general(dlogits.astype(w.dtype), w, _NT, preferred_element_type=jnp.float32)
    return dh, lax.dot_general(h, dlogits.astype(h.dtype), _TN, preferred_element_type=jnp.float32)


def _stats_init(n: int):
    return (
        jnp.full((n, 1), -jnp.inf, jnp.float32),
        jnp.zeros((n, 1), jnp.float32),
        jnp.zeros((n, 1), jnp.float32),
    )


def _merge(a, b):
    """Two online log-sum-exp states over disjoint columns -> one."""
    m = jnp.maximum(a[0], b[0])
    return m, a[1] * jnp.exp(a[0] - m) + b[1] * jnp.exp(b[0] - m), a[2] + b[2]


# --------------------------------------------------------------------------------- pallas (TPU)
# Every kernel gets the chunk's `lo` as a scalar-prefetch (SMEM) argument.


def _fwd_kernel(lo_ref, h_ref, w_ref, tok_ref, m_ref, l_ref, t_ref):
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        m_ref[...], l_ref[...], t_ref[...] = _stats_init(m_ref.shape[0])

    carry = (m_ref[...], l_ref[...], t_ref[...])
    stats = _tile_stats(h_ref[...], w_ref[...], tok_ref[...], j * w_ref.shape[1], lo_ref[0], carry)
    m_ref[...], l_ref[...], t_ref[...] = stats


def _dh_kernel(lo_ref, h_ref, w_ref, tok_ref, lse_ref, g_ref, dh_ref):
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        dh_ref[...] = jnp.zeros(dh_ref.shape, jnp.float32)

    w = w_ref[...]
    col0 = j * w.shape[1]
    dlogits = _tile_dlogits(h_ref[...], w, tok_ref[...], lse_ref[...], g_ref[...], col0, lo_ref[0])
    dh_ref[...] += lax.dot_general(dlogits.astype(w.dtype), w, _NT, preferred_element_type=jnp.float32)


def _dw_kernel(lo_ref, h_ref, w_ref, tok_ref, lse_ref, g_ref, dw_ref):
    j, i = pl.program_id(0), pl.program_id(1)

    @pl.when(i == 0)
    def _init():
        dw_ref[...] = jnp.zeros(dw_ref.shape, jnp.float32)

    h = h_ref[...]
    col0 = j * w_ref.shape[1]
    dlogits = _tile_dlogits(h, w_ref[...], tok_ref[...], lse_ref[...], g_ref[...], col0, lo_ref[0])
    dw_ref[...] += lax.dot_general(h, dlogits.astype(h.dtype), _TN, preferred_element_type=jnp.float32)


def _once_per_row(block_shape, index_map):
    """A block that changes once per row of the grid (hidden in, dh out): one VMEM buffer; the
    pipeline waits for its copy once per `chunk / vocab` steps instead of holding a second one."""
    return pl.BlockSpec(block_shape, index_map, pipeline_mode=pl.Buffered(1))


def _pallas(cfg: _Config, kernel, name: str, grid, in_specs, out_specs, out_shape, *args):
    limit = cfg.tiles.vmem_limits[_KERNELS.index(name)]
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=grid, in_specs=in_specs, out_specs=out_specs
        ),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary"), vmem_limit_bytes=limit
        ),
        interpret=cfg.interpret,
        name=f"token_logprobs_{name}",
    )(*args)


def _row_specs(tiles: Tiles, d: int, columns: int):
    """BlockSpecs of the fwd/dh kernels (grid: row blocks x vocabulary blocks): the `[rows, 1]`
    column spec, and the inputs hidden, W tile and `columns` such columns."""
    row = pl.BlockSpec((tiles.rows, 1), lambda i, j, lo: (i, 0))
    hidden = _once_per_row((tiles.rows, d), lambda i, j, lo: (i, 0))
    return row, [hidden, pl.BlockSpec((d, tiles.vocab), lambda i, j, lo: (0, j)), *[row] * columns]


def _pallas_stats(cfg: _Config, h, w, tokens, lo):
    """Statistics (max, sum, token logit; `[n, 1]` each) of one chunk `w` `[D, c]`."""
    (n, d), t = h.shape, cfg.tiles
    row, in_specs = _row_specs(t, d, 1)
    out_shape = [jax.ShapeDtypeStruct((n, 1), jnp.float32)] * 3
    grid = (n // t.rows, w.shape[1] // t.vocab)
    return _pallas(cfg, _fwd_kernel, "fwd", grid, in_specs, [row] * 3, out_shape, lo, h, w, tokens)


def _pallas_grads(cfg: _Config, h, w, tokens, lse, g, lo):
    """dh `[n, D]` and dW `[D, c]` (float32) of one chunk `w` `[D, c]`."""
    (n, d), t = h.shape, cfg.tiles
    _, in_specs = _row_specs(t, d, 3)
    out_spec = _once_per_row((t.rows, d), lambda i, j, lo: (i, 0))
    out_shape = jax.ShapeDtypeStruct((n, d), jnp.float32)
    grid = (n // t.rows, w.shape[1] // t.vocab)
    dh = _pallas(cfg, _dh_kernel, "dh", grid, in_specs, out_spec, out_shape, lo, h, w, tokens, lse, g)
    # dW: grid vocabulary blocks x row blocks
    row = pl.BlockSpec((t.dw_rows, 1), lambda j, i, lo: (i, 0))
    hidden = pl.BlockSpec((t.dw_rows, d), lambda j, i, lo: (i, 0))
    in_specs = [hidden, pl.BlockSpec((d, t.dw_vocab), lambda j, i, lo: (0, j)), row, row, row]
    out_spec = pl.BlockSpec((d, t.dw_vocab), lambda j, i, lo: (0, j))
    out_shape = jax.ShapeDtypeStruct(w.shape, jnp.float32)
    grid = (w.shape[1] // t.dw_vocab, n // t.dw_rows)
    dw = _pallas(cfg, _dw_kernel, "dw", grid, in_specs, out_spec, out_shape, lo, h, w, tokens, lse, g)
    return dh, dw


# ------------------------------------------------------------------- vocabulary chunks, one shard


class _Sharding(NamedTuple):
    mesh: Mesh
    rows: str | tuple[str, ...] | None  # mesh axes splitting the rows (the batch)
    embed: str | tuple[str, ...] | None  # mesh axes splitting the head's model dimension (within rows)
    vocab: str | tuple[str, ...] | None  # mesh axes splitting the head's vocabulary


class _Config(NamedTuple):
    impl: str  # "chunked" or "pallas"
    vocab: int  # columns of the head one shard holds
    chunk: int  # columns per step of the loop over the vocabulary (pallas: a multiple of the tiles)
    tiles: Tiles | None  # pallas only
    interpret: bool
    sharding: _Sharding | None  # pallas under a mesh: per shard in shard_map


def _over_chunks(cfg: _Config, w, tokens, body, carry):
    """`carry = body(w_chunk, start, tokens_chunk, lo, carry)` over this shard's vocabulary in
    `cfg.chunk`-column chunks: the last one first, aligned to end at the last column (its first
    `lo` columns repeat the previous chunk's and are masked), then the whole chunks in order, so
    every chunk has one shape and each kernel is compiled once. Each chunk is all-gathered over
    the mesh axes that split the head's model dimension, so the whole head never is; tokens
    become relative to the chunk (-1 when outside its valid columns)."""
    sharding, c, v = cfg.sharding, cfg.chunk, cfg.vocab
    full, rest = divmod(v, c)
    tail = int(rest > 0)

    def step(j, carry):
        start, lo = (j - tail) * c, 0
        if tail:
            start = jnp.where(j == 0, v - c, start)
            lo = jnp.where(j == 0, c - rest, 0)
        w_chunk = lax.dynamic_slice_in_dim(w, start, c, axis=1)
        if sharding is not None and sharding.embed is not None:
            w_chunk = lax.all_gather(w_chunk, sharding.embed, axis=0, tiled=True)
        rel = tokens - start
        rel = jnp.where((rel >= lo) & (rel < c), rel, -1)
        return body(w_chunk, start, rel, jnp.asarray(lo, jnp.int32).reshape(1), carry)

    return lax.fori_loop(0, full + tail, step, carry)


def _shard_rows(cfg: _Config, h, tokens, *columns):
    """`[B, T, ...]` -> `[n, ...]` rows (padded to the Pallas row blocks), tokens as an int32
    `[n, 1]` column made relative to this shard's first vocabulary column, `[B, T]` as columns."""
    b, t, _ = h.shape
    n = b * t
    pad = 0
    if cfg.impl == "pallas":
        block = max(cfg.tiles.rows, cfg.tiles.dw_rows)
        pad = -(-n // block) * block - n

    def rows(x):
        return jnp.pad(x.reshape(n, -1), ((0, pad), (0, 0)))

    offset = 0
    if cfg.sharding is not None and cfg.sharding.vocab is not None:
        offset = lax.axis_index(cfg.sharding.vocab) * cfg.vocab
    return n, rows(h), rows(tokens.astype(jnp.int32) - offset), *(rows(c) for c in columns)


def _local_forward(cfg: _Config, h, w, tokens):
    """log-prob and log-sum-exp `[B, T]` of this shard's rows (combined over vocabulary shards)."""
    b, t, _ = h.shape
    n, h, tokens = _shard_rows(cfg, h.astype(jnp.promote_types(h.dtype, w.dtype)), tokens)

    def body(w_chunk, start, tokens, lo, carry):
        if cfg.impl == "pallas":
            return _merge(carry, _pallas_stats(cfg, h, w_chunk, tokens, lo))
        return _tile_stats(h, w_chunk, tokens, 0, lo[0], carry)

    m, l, tok = _over_chunks(cfg, w, tokens, body, _stats_init(h.shape[0]))
    if cfg.sharding is not None and cfg.sharding.vocab is not None:
        axes = cfg.sharding.vocab
        m_all = lax.pmax(m, axes)
        m, l, tok = m_all, lax.psum(l * jnp.exp(m - m_all), axes), lax.psum(tok, axes)
    lse = m + jnp.log(l)
    return (tok - lse)[:n].reshape(b, t), lse[:n].reshape(b, t)


def _local_backward(cfg: _Config, h, w, tokens, lse, g):
    """dh `[B, T, D]` of this shard's rows; dW of this shard's block of the head, summed over
    the row shards (reduce-scattered over the model-dimension axes, summed over the others)."""
    b, t, d = h.shape
    n, hc, tokens, lse, g = _shard_rows(cfg, h.astype(jnp.promote_types(h.dtype, w.dtype)), tokens, lse, g)
    sharding = cfg.sharding

    def reduce(dw):
        if sharding is None:
            return dw
        if sharding.embed is not None:
            dw = lax.psum_scatter(dw, sharding.embed, scatter_dimension=0, tiled=True)
        others = tuple(a for a in axis_names(sharding.rows) if a not in axis_names(sharding.embed))
        return lax.psum(dw, others) if others else dw

    def body(w_chunk, start, tokens, lo, carry):
        dh, dw = carry
        if cfg.impl == "pallas":
            dh_chunk, dw_chunk = _pallas_grads(cfg, hc, w_chunk, tokens, lse, g, lo)
        else:
            dh_chunk, dw_chunk = _tile_grads(hc, w_chunk, tokens, lse, g, lo[0])
        dw_chunk = reduce(dw_chunk).astype(w.dtype)
        return dh + dh_chunk, lax.dynamic_update_slice_in_dim(dw, dw_chunk, start, axis=1)

    carry = (jnp.zeros(hc.shape, jnp.float32), jnp.zeros(w.shape, w.dtype))
    dh, dw = _over_chunks(cfg, w, tokens, body, carry)
    if sharding is not None and sharding.vocab is not None:
        dh = lax.psum(dh, sharding.vocab)
    return dh[:n].reshape(b, t, d).astype(h.dtype), dw


# ------------------------------------------------------------------------------------ custom_vjp


def _shard_mapped(cfg: _Config, fn, in_specs, out_specs):
    if cfg.sharding is None:
        return functools.partial(fn, cfg)
    return jax.shard_map(
        functools.partial(fn, cfg),
        mesh=cfg.sharding.mesh,
        in_specs=in_specs,
        out_specs=out_specs,
        check_vma=False,
    )


def _specs(cfg: _Config):
    """PartitionSpecs of `[B, T]` rows, hidden `[B, T, D]` and the head `[D, V]` (or Nones)."""
    s = cfg.sharding or _Sharding(None, None, None, None)
    return PartitionSpec(s.rows, None), PartitionSpec(s.rows, None, None), PartitionSpec(s.embed, s.vocab)


def _forward(cfg: _Config, h, w, tokens):
    row, hidden, head = _specs(cfg)
    return _shard_mapped(cfg, _local_forward, (hidden, head, row), (row, row))(h, w, tokens)


def _backward(cfg: _Config, h, w, tokens, lse, g):
    row, hidden, head = _specs(cfg)
    return _shard_mapped(cfg, _local_backward, (hidden, head, row, row, row), (hidden, head))(
        h, w, tokens, lse, g
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_logprobs(cfg: _Config, h, w, tokens):
    return _forward(cfg, h, w, tokens)[0]


def _fused_fwd(cfg: _Config, h, w, tokens):
    logp, lse = _forward(cfg, h, w, tokens)
    return logp, (h, w, tokens, lse)


def _fused_bwd(cfg: _Config, res, g):
    h, w, tokens, lse = res
    dh, dw = _backward(cfg, h, w, tokens, lse, g.astype(jnp.float32))
    return dh, dw, None


_fused_logprobs.defvjp(_fused_fwd, _fused_bwd)


# --------------------------------------------------------------------------------------- public


def gathered_logprobs(
    hidden: jax.Array,
    lm_head: jax.Array,
    tokens: jax.Array,
    valid: jax.Array | None = None,
    *,
    chunk: int,
    groups: int = 1,
    vocab_tile: int = CHUNKED_VOCAB_TILE,
) -> jax.Array:
    """Log-probability `[B, T]` (float32) of `tokens` under `softmax(hidden @ lm_head)`, computed
    only where `valid` (0 elsewhere; None: everywhere), in plain XLA with its own backward pass.

    The rows are taken in `groups` blocks of consecutive rows (1: the whole batch; a sharded batch:
    its number of shards, so that a block never leaves its device); each block's valid positions
    are moved to its front (stable, so in order) and taken `B / groups · chunk` at a time, a chunk
    that no block reaches skipped (`lax.cond`, forward and backward): the cost follows the largest
    block's count of valid positions, not B · T. Each chunk applies the head `vocab_tile` columns at
    a time (the chunked implementation's online log-sum-exp; the whole vocabulary when it is
    smaller), and the backward pass recomputes them (d logp / d logits = onehot − softmax), summing
    the head's gradient over the chunks in the loop's carry. Every position's value is its own
    row's: the grouping changes only which positions share a chunk."""
    b, t, d = hidden.shape
    if valid is None:
        groups = b  # every position computed, one row per block: nothing to move
    elif b % groups:
        raise ValueError(f"gathered_logprobs: {b} rows do not split into {groups} blocks")
    n_pos = b // groups * t  # positions per block
    hidden = hidden.reshape(groups, n_pos, d)
    tokens = tokens.reshape(groups, n_pos).astype(jnp.int32)
    chunk = min(chunk * (b // groups), n_pos)
    order = limit = None  # limit: positions of each block to compute (None: all)
    if valid is not None:
        flat_valid = valid.reshape(groups, n_pos)
        order = jnp.argsort(~flat_valid, axis=1, stable=True)  # [G, N]: each block's valid first
        hidden = jnp.take_along_axis(hidden, order[..., None], axis=1)
        tokens = jnp.take_along_axis(tokens, order, axis=1)
        limit = flat_valid.sum(axis=1).max()  # chunks at or past it hold no valid position of any block
    pad = -n_pos % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        tokens = jnp.pad(tokens, ((0, 0), (0, pad)))
    n = (n_pos + pad) // chunk
    hs = hidden.reshape(groups, n, chunk, d).swapaxes(0, 1)  # [n, G, c, D]
    ts = tokens.reshape(groups, n, chunk).swapaxes(0, 1)  # [n, G, c]
    logp = _gathered(chunk, vocab_tile, hs, ts, limit, lm_head)  # [n, G, c]
    logp = logp.swapaxes(0, 1).reshape(groups, n_pos + pad)[:, :n_pos]  # [G, N]
    if order is not None:
        logp = jnp.take_along_axis(logp, jnp.argsort(order, axis=1), axis=1)  # back to the positions
    logp = logp.reshape(b, t)
    return logp if valid is None else jnp.where(valid, logp, 0.0)


def _over_row_chunks(chunk: int, limit, body, skip, carry, xs):
    """`lax.scan` of `body(carry, x)` over the chunks (leading axis of `xs`), `skip` in place of
    `body` for a chunk at or past `limit` positions (None: none skipped)."""

    def step(carry, ix):
        i, x = ix
        if limit is None:
            return body(carry, x)
        return lax.cond(i * chunk < limit, body, skip, carry, x)

    n = jax.tree.leaves(xs)[0].shape[0]
    return lax.scan(step, carry, (jnp.arange(n), xs))


def _tiled_config(lm_head: jax.Array, vocab_tile: int) -> _Config:
    """The chunked (plain XLA) implementation over `vocab_tile` columns of the head at a time."""
    return _Config("chunked", lm_head.shape[1], min(vocab_tile, lm_head.shape[1]), None, False, None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _gathered(chunk: int, vocab_tile: int, hs, ts, limit, lm_head) -> jax.Array:
    return _gathered_fwd(chunk, vocab_tile, hs, ts, limit, lm_head)[0]


def _gathered_fwd(chunk, vocab_tile, hs, ts, limit, lm_head):
    """Per-chunk log-probs `[n, G, c]` and log-sum-exp (the backward pass's only residual besides
    the inputs)."""
    cfg = _tiled_config(lm_head, vocab_tile)

    def body(_, x):
        return None, _local_forward(cfg, x[0], lm_head, x[1])

    def skip(_, x):
        zeros = jnp.zeros(x[1].shape, jnp.float32)
        return None, (zeros, zeros)

    _, (logp, lse) = _over_row_chunks(chunk, limit, body, skip, None, (hs, ts))
    return logp, (hs, ts, limit, lse, lm_head)


def _gathered_bwd(chunk, vocab_tile, res, g):
    hs, ts, limit, lse, lm_head = res
    cfg = _tiled_config(lm_head, vocab_tile)

    def body(dw, x):
        h, tok, lse_c, g_c = x
        dh, dw_c = _local_backward(cfg, h, lm_head, tok, lse_c, g_c.astype(jnp.float32))
        return dw + dw_c.astype(jnp.float32), dh

    def skip(dw, x):
        return dw, jnp.zeros_like(x[0])

    zeros = jnp.zeros(lm_head.shape, jnp.float32)
    dw, dhs = _over_row_chunks(chunk, limit, body, skip, zeros, (hs, ts, lse, g))
    return dhs, None, None, dw.astype(lm_head.dtype)


_gathered.defvjp(_gathered_fwd, _gathered_bwd)


def token_logprobs_reference(hidden: jax.Array, lm_head: jax.Array, tokens: jax.Array) -> jax.Array:
    """Plain-jnp per-token log-probs `[B, T]` float32 (materialises the `[B, T, V]` float32 logits)."""
    logits = jnp.einsum("btd,dv->btv", hidden, lm_head, preferred_element_type=jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logp, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]


def _resolve_impl(impl: str, platform: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"policy loss: unknown impl {impl!r}; expected one of {IMPLS}")
    if impl == "auto":
        return "pallas" if platform == "tpu" else "chunked"
    if impl == "pallas" and platform != "tpu" and not pallas_interpret():
        raise ValueError(
            f"policy loss: impl 'pallas' needs a TPU target (the mesh's devices or the backend are "
            f"{platform!r}); set PATHOR1_PALLAS_INTERPRET=1 to interpret it"
        )
    return impl


def _sharding(b: int, d: int, vocab: int) -> _Sharding | None:
    """How the Pallas path splits over the mesh of `use_rules` (None outside one; module doc)."""
    ctx = logical.current_rules()
    if ctx is None:
        return None
    mesh, rules = ctx

    def size(axes) -> int:
        return math.prod(mesh.shape[a] for a in axis_names(axes))

    rows = logical.logical_to_spec(("batch",), rules)[0]
    rows = rows if b % size(rows) == 0 else None
    embed, vocab_axes = logical.logical_to_spec(("embed", "vocab"), rules)
    if not set(axis_names(embed)) <= set(axis_names(rows)) or d % size(embed):
        embed = None  # the head is all-gathered once at the shard_map boundary instead
    if set(axis_names(vocab_axes)) & set(axis_names(rows)) or vocab % size(vocab_axes):
        vocab_axes = None
    return _Sharding(mesh, rows, embed, vocab_axes)


def _fit_rows(tiles: Tiles, n: int) -> Tiles:
    """Row blocks no taller than one shard's row count (rounded up to a power of two)."""
    cap = _pow2_at_least(n, 8, 1 << 30)
    return tiles._replace(rows=min(tiles.rows, cap), dw_rows=min(tiles.dw_rows, cap))


def token_logprobs(
    hidden: jax.Array,
    lm_head: jax.Array,
    tokens: jax.Array,
    *,
    temperature: float = 1.0,
    impl: str = "auto",
    valid: jax.Array | None = None,
) -> jax.Array:
    """Log-probability `[B, T]` (float32) of `tokens` under `softmax(hidden @ lm_head / temperature)`.

    hidden `[B, T, D]`, lm_head `[D, V]`, tokens `[B, T]` int. Tiled over the vocabulary for
    impl "chunked" (`CHUNKED_VOCAB_TILE` columns per step) and "pallas" (tiles from
    `pallas_tiles` for the target chip), see the module doc. `temperature` (a Python float > 0)
    divides the hidden states before the dispatch. `valid` `[B, T]` bool: 0 elsewhere; the chunked
    impl then computes only the valid positions (`gathered_logprobs`, `GATHERED_ROW_CHUNK` per row
    at a time), the others everywhere.
    """
    if hidden.ndim != 3 or lm_head.ndim != 2 or hidden.shape[-1] != lm_head.shape[0]:
        raise ValueError(
            f"token_logprobs: hidden {hidden.shape} must be [B, T, D] and lm_head {lm_head.shape} [D, V]"
        )
    if tokens.shape != hidden.shape[:2]:
        raise ValueError(f"token_logprobs: tokens {tokens.shape} must be [B, T] = {hidden.shape[:2]}")
    if not temperature > 0:
        raise ValueError(f"token_logprobs: temperature must be > 0, got {temperature}")
    if temperature != 1.0:
        hidden = hidden / jnp.asarray(temperature, hidden.dtype)  # logits / T = (hidden / T) @ W
    impl = _resolve_impl(impl, target_platform())
    note_impl("policy_loss", impl)
    if impl == "chunked" and valid is not None:
        groups = _row_blocks(hidden.shape[0])
        return gathered_logprobs(
            hidden,
            lm_head,
            tokens,
            valid,
            chunk=GATHERED_ROW_CHUNK,
            groups=groups,
            vocab_tile=CHUNKED_VOCAB_TILE,
        )
    logp = _token_logprobs(hidden, lm_head, tokens, impl)
    return logp if valid is None else jnp.where(valid, logp, 0.0)


def _row_blocks(b: int) -> int:
    """The blocks of rows the batch axes of the rules in context split `b` rows into (1 outside)."""
    ctx = logical.current_rules()
    if ctx is None:
        return 1
    parts = logical.batch_parts(*ctx)
    return parts if b % parts == 0 else 1


def _token_logprobs(hidden: jax.Array, lm_head: jax.Array, tokens: jax.Array, impl: str) -> jax.Array:
    if impl == "xla":
        return token_logprobs_reference(hidden, lm_head, tokens)
    (b, t, d), vocab = hidden.shape, lm_head.shape[1]
    if impl == "chunked":
        return _fused_logprobs(_tiled_config(lm_head, CHUNKED_VOCAB_TILE), hidden, lm_head, tokens)
    sharding = _sharding(b, d, vocab)
    rows = b * t
    if sharding is not None:
        vocab //= math.prod(sharding.mesh.shape[a] for a in axis_names(sharding.vocab))
        rows //= math.prod(sharding.mesh.shape[a] for a in axis_names(sharding.rows))
    chip = _DEVICE_KINDS.get(target_device_kind(), DEFAULT_CHIP)
    tiles = _fit_rows(pallas_tiles(chip, d, hidden.dtype, lm_head.dtype), rows)
    tile = max(tiles.vocab, tiles.dw_vocab)
    chunk = min(-(-PALLAS_VOCAB_CHUNK // tile), vocab // tile) * tile
    if not chunk:
        raise ValueError(
            f"policy loss: impl 'pallas' needs at least {tile} vocabulary columns per shard, got {vocab}"
        )
    # interpreted only off a TPU target (as the attention): a TPU compile always gets the Mosaic kernels
    interpret = target_platform() != "tpu" and pallas_interpret()
    cfg = _Config("pallas", vocab, chunk, tiles, interpret, sharding)
    return _fused_logprobs(cfg, hidden, lm_head, tokens)


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _aggregate(per_token: jax.Array, mask: jax.Array, agg: str, group_size: int) -> jax.Array:
    """The loss from masked per-token values `[B, T]` (see the module doc for the modes)."""
    if agg == "token-mean":
        return jnp.sum(per_token) / jnp.maximum(jnp.sum(mask), 1.0)
    if agg == "seq-mean-token-mean":
        rows, counts = jnp.sum(per_token, axis=1), jnp.sum(mask, axis=1)  # [B]
    else:  # group-mean-token-mean
        b = per_token.shape[0]
        if group_size < 1 or b % group_size:
            raise ValueError(f"agg {agg!r}: {b} sequences are not whole groups of group_size={group_size}")
        rows = jnp.sum(per_token, axis=1).reshape(b // group_size, group_size).sum(axis=1)  # [groups]
        counts = jnp.sum(mask, axis=1).reshape(b // group_size, group_size).sum(axis=1)
    means = rows / jnp.maximum(counts, 1.0)
    return jnp.sum(means) / jnp.maximum(jnp.sum(counts > 0), 1)


def clipped_surrogate(
    logp: jax.Array,
    old_logprobs: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    eps_low: float,
    eps_high: float,
    ref_logprobs: jax.Array | None = None,
    beta: float = 0.0,
    agg: str = "token-mean",
    group_size: int = 1,
    dual_clip: float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Loss (= -objective) and metrics from per-token log-probs `[B, T]` (see module doc).

    `group_size`: sequences per group, for agg "group-mean-token-mean". `dual_clip`: the constant c
    > 1 bounding the objective of negative-advantage tokens below by c·A (None: no dual clip).
    """
    if agg not in AGG_MODES:
        raise ValueError(f"clipped_policy_loss: unknown agg {agg!r}; expected one of {AGG_MODES}")
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"clipped_policy_loss: dual_clip must be > 1 (or None), got {dual_clip}")
    mask = mask.astype(jnp.float32)
    ratio = jnp.exp(logp - old_logprobs)  # [B, T]
    adv = advantages.astype(jnp.float32)[:, None]  # [B, 1]
    unclipped = ratio * adv
    clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    objective = jnp.minimum(unclipped, clipped)
    dual_clipped = jnp.zeros_like(objective, dtype=bool)
    if dual_clip is not None:
        floor = dual_clip * adv
        dual_clipped = (adv < 0) & (objective < floor)
        objective = jnp.where(dual_clipped, floor, objective)
    kl = jnp.zeros_like(logp)
    if ref_logprobs is not None:
        log_r = ref_logprobs - logp
        kl = jnp.exp(log_r) - log_r - 1.0
        objective = objective - beta * kl
    loss = _aggregate(-objective * mask, mask, agg, group_size)
    metrics = {
        "clip_fraction": _masked_mean((clipped < unclipped).astype(jnp.float32), mask),
        "dual_clip_fraction": _masked_mean(dual_clipped.astype(jnp.float32), mask),
        "mean_ratio": _masked_mean(ratio, mask),
        "kl": _masked_mean(kl, mask),
    }
    return loss, jax.tree.map(lax.stop_gradient, metrics)


def clipped_policy_loss(
    hidden: jax.Array,
    lm_head: jax.Array,
    tokens: jax.Array,
    old_logprobs: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    eps_low: float,
    eps_high: float,
    ref_logprobs: jax.Array | None = None,
    beta: float = 0.0,
    agg: str = "token-mean",
    group_size: int = 1,
    dual_clip: float | None = None,
    temperature: float = 1.0,
    impl: str = "auto",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped policy-gradient loss from final hidden states (see module doc for the formulas).

    hidden `[B, T, D]`, lm_head `[D, V]`, tokens `[B, T]` (sampled token at each position, i.e.
    already shifted to align with hidden), old/ref log-probs `[B, T]` (at the same `temperature`),
    advantages `[B]`, mask `[B, T]` (1 = response token). Returns `(loss, {"clip_fraction",
    "dual_clip_fraction", "mean_ratio", "kl"})`.
    """
    b, t = tokens.shape
    for name, x in (("old_logprobs", old_logprobs), ("mask", mask), ("ref_logprobs", ref_logprobs)):
        if x is not None and x.shape != (b, t):
            raise ValueError(f"clipped_policy_loss: {name} {x.shape} must be [B, T] = {(b, t)}")
    if advantages.shape != (b,):
        raise ValueError(f"clipped_policy_loss: advantages {advantages.shape} must be [B] = {(b,)}")
    valid = mask > 0
    logp = token_logprobs(hidden, lm_head, tokens, temperature=temperature, impl=impl, valid=valid)
    # off the response the log-prob is not computed: π_old's there, so every ratio stays 1 (finite)
    logp = jnp.where(valid, logp, old_logprobs)
    return clipped_surrogate(
        logp,
        old_logprobs,
        advantages,
        mask,
        eps_low=eps_low,
        eps_high=eps_high,
        ref_logprobs=ref_logprobs,
        beta=beta,
        agg=agg,
        group_size=group_size,
        dual_clip=dual_clip,
    )


def clipped_policy_loss_reference(
    hidden: jax.Array,
    lm_head: jax.Array,
    tokens: jax.Array,
    old_logprobs: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    eps_low: float,
    eps_high: float,
    ref_logprobs: jax.Array | None = None,
    beta: float = 0.0,
    agg: str = "token-mean",
    group_size: int = 1,
    dual_clip: float | None = None,
    temperature: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The same loss with plain jnp, materialising the float32 logits (`impl="xla"`)."""
    return clipped_policy_loss(
        hidden,
        lm_head,
        tokens,
        old_logprobs,
        advantages,
        mask,
        eps_low=eps_low,
        eps_high=eps_high,
        ref_logprobs=ref_logprobs,
        beta=beta,
        agg=agg,
        group_size=group_size,
        dual_clip=dual_clip,
        temperature=temperature,
        impl="xla",
    )

"""One attention entry point for every model in pathor1_jax.

Layout `[B, T, H, D]` for queries and `[B, S, K, D]` for keys/values, with K dividing H (GQA).
Masking is expressed with segment ids only: a query attends to a key iff their segment ids are
equal (and, when `causal`, the key is not in the query's future). Padding, sequence packing,
Qwen2.5-VL vision windows and per-image attention are all segment ids. When segments are contiguous
runs much shorter than the sequence (vision windows and images), `block_sparse=True` visits only the
key blocks that can share a segment with each query block (`blocked_attention`).
"""

from __future__ import annotations

import functools
import logging
import math
import os

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from pathor1_jax import logical
from pathor1_jax.kernels.blocked_attention import blocked_attention
from pathor1_jax.kernels.flash_attention import flash_attention, tpu_vmem_bytes
from pathor1_jax.kernels.platform import note_impl, target_platform

logger = logging.getLogger(__name__)

SegmentIds = jax.Array | tuple[jax.Array, jax.Array] | None


def _split_segment_ids(segment_ids: SegmentIds) -> tuple[jax.Array | None, jax.Array | None]:
    if segment_ids is None:
        return None, None
    if isinstance(segment_ids, tuple):
        return segment_ids
    return segment_ids, segment_ids


def attention_mask(
    q_len: int, kv_len: int, segment_ids: SegmentIds = None, causal: bool = False
) -> jax.Array | None:
    """Boolean mask `[B or 1, 1, T, S]` (True = attend), or None when nothing is masked.

    Causal masking aligns the last query with the last key (query i sits at key position
    `S - T + i`), which is the usual convention for a query block at the end of the keys.
    """
    q_seg, kv_seg = _split_segment_ids(segment_ids)
    mask = None
    if q_seg is not None:
        mask = (q_seg[:, :, None] == kv_seg[:, None, :])[:, None]  # [B, 1, T, S]
    if causal:
        q_pos = jnp.arange(q_len)[:, None] + (kv_len - q_len)
        k_pos = jnp.arange(kv_len)[None, :]
        causal_mask = (k_pos <= q_pos)[None, None]  # [1, 1, T, S]
        mask = causal_mask if mask is None else mask & causal_mask
    return mask


def attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: SegmentIds = None,
    causal: bool = False,
    sm_scale: float | None = None,
) -> jax.Array:
    """Plain-jnp softmax attention: the numerical reference and the CPU production path.

    q: `[B, T, H, D]`, k/v: `[B, S, K, D]` with `H % K == 0`; segment_ids: `[B, T]` when T == S,
    or a pair (`[B, T]` query ids, `[B, S]` key ids). Logits and softmax are computed in float32.
    Returns `[B, T, H, D]` in q's dtype.
    """
    b, t, h, d = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    if h % kv_heads:
        raise ValueError(f"attention: {h} query heads are not a multiple of {kv_heads} kv heads")
    groups = h // kv_heads
    scale = d**-0.5 if sm_scale is None else sm_scale
    qg = q.reshape(b, t, kv_heads, groups, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    mask = attention_mask(t, s, segment_ids, causal)
    if mask is not None:
        logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d).astype(q.dtype)


IMPLS = ("auto", "xla", "pallas_tpu", "pallas_gpu")
# Kernel tiles per backend (block_q, block_k) and the head dims each kernel supports. TPU: the head
# dims of our models (CLIP 64, Qwen2.5-VL vision 80, text 128) and 256, each compiled by Mosaic
# forward and backward in tests/test_attention_tpu_compile.py (below 128 Mosaic pads the lanes).
_BLOCKS = {"pallas_tpu": (128, 128), "pallas_gpu": (64, 64)}
_HEAD_DIMS = {"pallas_tpu": (64, 80, 128, 256), "pallas_gpu": (16, 32, 64, 128, 256)}
_KERNELS = {"tpu": "pallas_tpu", "gpu": "pallas_gpu"}
# The TPU kernels hold one head's whole K/V (or Q/dO) row in VMEM; longer rows run xla.
TPU_VMEM_BUDGET = 64 * 2**20
_logged: set[str] = set()


def pallas_interpret() -> bool:
    """Interpret Pallas kernels (CPU testing) when `PATHOR1_PALLAS_INTERPRET=1`."""
    return os.environ.get("PATHOR1_PALLAS_INTERPRET", "0") == "1"


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.warning(message)


def select_impl(q_len: int, kv_len: int, head_dim: int, backend: str | None = None, itemsize: int = 2) -> str:
    """The implementation `impl="auto"` runs for these shapes on platform `backend` ("cpu", "gpu",
    "tpu"; default: `platform.target_platform()`, the devices of the mesh in context)."""
    kernel = _KERNELS.get(backend or target_platform())
    if kernel is None:
        return "xla"
    if head_dim not in _HEAD_DIMS[kernel]:
        _log_once(f"attention: head_dim {head_dim} not in {_HEAD_DIMS[kernel]} for {kernel}; using xla")
        return "xla"
    block = max(_BLOCKS[kernel])
    if min(q_len, kv_len) < block:
        _log_once(
            f"attention: length {min(q_len, kv_len)} shorter than one {block} block for {kernel}; using xla"
        )
        return "xla"
    if kernel == "pallas_tpu" and tpu_vmem_bytes(q_len, kv_len, head_dim, itemsize) > TPU_VMEM_BUDGET:
        _log_once(
            f"attention: length {max(q_len, kv_len)} needs more than "
            f"{TPU_VMEM_BUDGET >> 20} MiB of VMEM for pallas_tpu; using xla"
        )
        return "xla"
    return kernel


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: SegmentIds = None,
    causal: bool = False,
    sm_scale: float | None = None,
    impl: str = "auto",
    block_sparse: bool = False,
) -> jax.Array:
    """Dispatch to an attention implementation (see module doc for the masking semantics).

    impl: "xla" (plain jnp), "pallas_tpu" (Mosaic TPU flash kernel), "pallas_gpu" (Triton flash
    kernel) or "auto": the kernel for the platform the code is compiled for (`target_platform()`:
    the devices of the mesh in context, so an ahead-of-time compile for a TPU topology from a CPU
    host gets the TPU kernel; else `jax.default_backend()`) when its constraints hold (head dim, at
    least one block of length, the TPU VMEM budget; other lengths are padded), else xla (the reason
    is logged once). CPU always runs xla under "auto". A Pallas impl needs its platform in
    `target_platform()`, or `PATHOR1_PALLAS_INTERPRET=1` to run it interpreted (tests on CPU).

    block_sparse: self-attention (one `[B, T]` segment_ids, not causal) whose equal ids form short
    contiguous runs; xla then runs `blocked_attention` (memory O(T · block) instead of O(T²)) and
    the TPU kernel skips the blocks no query of a block can attend to (compute O(T · segment)).
    """
    if impl not in IMPLS:
        raise ValueError(f"attention: unknown impl {impl!r}; expected one of {IMPLS}")
    if block_sparse and (causal or segment_ids is None or isinstance(segment_ids, tuple)):
        raise ValueError("attention: block_sparse needs self-attention segment_ids [B, T] and causal=False")
    if impl == "auto":
        impl = select_impl(q.shape[1], k.shape[1], q.shape[3], itemsize=q.dtype.itemsize)
    note_impl("attention", "xla_blocked" if impl == "xla" and block_sparse else impl)
    if impl == "xla" and block_sparse:
        return blocked_attention(q, k, v, segment_ids, sm_scale=sm_scale)
    if impl == "xla":
        return attention_reference(q, k, v, segment_ids=segment_ids, causal=causal, sm_scale=sm_scale)
    platform, target = impl.removeprefix("pallas_"), target_platform()
    interpret = target != platform and pallas_interpret()
    if target != platform and not interpret:
        raise ValueError(
            f"attention: impl {impl!r} needs a {platform.upper()} (the mesh in context / backend is "
            f"{target!r}); set PATHOR1_PALLAS_INTERPRET=1 to interpret it"
        )
    block_q, block_k = _BLOCKS[impl]
    kernel = functools.partial(
        flash_attention,
        causal=causal,
        sm_scale=sm_scale,
        backend=platform,
        block_q=block_q,
        block_k=block_k,
        interpret=interpret,
        block_sparse=block_sparse and platform == "tpu",  # the Triton kernels run every block
    )
    return _per_shard(kernel, q, k, v, segment_ids)


def _per_shard(kernel, q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: SegmentIds) -> jax.Array:
    """Run a Pallas kernel per shard inside `logical.use_rules(mesh, rules)`; plain call outside.

    A `pallas_call` is opaque to XLA's partitioner, so under a mesh it runs in `shard_map` with the
    batch split as the rules split "batch" and the heads as they split "heads"/"kv_heads" (only
    when both head counts divide, so each shard keeps whole GQA groups). Lengths stay whole.
    """
    ctx = logical.current_rules()
    if ctx is None:
        return kernel(q, k, v, segment_ids=segment_ids)
    mesh, rules = ctx

    def fits(axes, n: int):
        if axes is None:
            return None
        size = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
        return axes if n % size == 0 else None

    batch = fits(logical.logical_to_spec(("batch",), rules)[0], q.shape[0])
    heads = logical.logical_to_spec(("heads",), rules)[0]
    kv_heads = logical.logical_to_spec(("kv_heads",), rules)[0]
    if heads != kv_heads or fits(heads, q.shape[2]) is None or fits(kv_heads, k.shape[2]) is None:
        heads = None
    if batch is not None and heads is not None:
        used = set((batch,) if isinstance(batch, str) else batch)
        heads = None if used.intersection((heads,) if isinstance(heads, str) else heads) else heads
    qkv_spec = PartitionSpec(batch, None, heads, None)
    seg_spec = PartitionSpec(batch, None)
    segs = () if segment_ids is None else segment_ids if isinstance(segment_ids, tuple) else (segment_ids,)

    def local(q, k, v, *segs):
        ids = None if not segs else segs if len(segs) == 2 else segs[0]
        return kernel(q, k, v, segment_ids=ids)

    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(qkv_spec, qkv_spec, qkv_spec, *(seg_spec,) * len(segs)),
        out_specs=qkv_spec,
        check_vma=False,
    )(q, k, v, *segs)

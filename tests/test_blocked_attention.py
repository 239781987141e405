"""Block-sparse segment attention (`kernels/blocked_attention.py`): equal to the dense reference in
values and gradients, visits only nearby blocks, and its compiled temporaries grow linearly with the
sequence where the dense path's grow quadratically."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pathor1_jax.kernels.attention import attention, attention_reference
from pathor1_jax.kernels.blocked_attention import block_ranges, blocked_attention


def _runs(rng, t: int, max_len: int, pad: int = 0) -> np.ndarray:
    """Contiguous segments of random lengths 1..max_len (ids 1, 2, ...), the last `pad` ids 0."""
    ids, i = [], 1
    while len(ids) < t:
        ids += [i] * int(rng.integers(1, max_len + 1))
        i += 1
    ids = np.array(ids[:t], np.int32)
    ids[t - pad :] = 0
    return ids


def _qkv(rng, b, t, h, kv, d, dtype=jnp.float32):
    return tuple(jnp.asarray(rng.normal(size=(b, t, n, d)), dtype) for n in (h, kv, kv))


@pytest.mark.parametrize(
    "block, heads, kv_heads",
    [(8, 4, 4), (64, 4, 2)],  # blocks shorter and longer than the segments; GQA
)
def test_equals_reference_values_and_gradients(block, heads, kv_heads):
    rng = np.random.default_rng(block)
    b, t, d = 2, 150, 8
    q, k, v = _qkv(rng, b, t, heads, kv_heads, d)
    seg = jnp.asarray(np.stack([_runs(rng, t, 30, pad=7), _runs(rng, t, 12)]))
    w = jnp.asarray(rng.normal(size=(b, t, heads, d)), jnp.float32)

    def blocked(q, k, v):
        return blocked_attention(q, k, v, seg, block=block)

    def dense(q, k, v):
        return attention_reference(q, k, v, segment_ids=seg)

    np.testing.assert_allclose(jax.jit(blocked)(q, k, v), dense(q, k, v), atol=2e-6)
    grads = jax.jit(jax.grad(lambda *a: (blocked(*a) * w).sum(), argnums=(0, 1, 2)))(q, k, v)
    ref = jax.jit(jax.grad(lambda *a: (dense(*a) * w).sum(), argnums=(0, 1, 2)))(q, k, v)
    for g, r in zip(grads, ref, strict=True):
        np.testing.assert_allclose(g, r, atol=5e-6)


def test_unsorted_and_repeated_ids_stay_exact():
    """Ids need not be contiguous or sorted: the block ranges are conservative, never wrong."""
    rng = np.random.default_rng(1)
    q, k, v = _qkv(rng, 1, 96, 2, 2, 4)
    seg = jnp.asarray(rng.integers(0, 5, size=(1, 96)), jnp.int32)
    out = jax.jit(lambda q, k, v: blocked_attention(q, k, v, seg, block=16))(q, k, v)
    np.testing.assert_allclose(out, attention_reference(q, k, v, segment_ids=seg), atol=2e-6)


def test_bfloat16_close_to_reference():
    rng = np.random.default_rng(2)
    q, k, v = _qkv(rng, 1, 128, 4, 4, 16, jnp.bfloat16)
    seg = jnp.asarray(_runs(rng, 128, 20)[None])
    out = jax.jit(lambda q, k, v: blocked_attention(q, k, v, seg, block=32))(q, k, v)
    assert out.dtype == jnp.bfloat16
    ref = attention_reference(q, k, v, segment_ids=seg)
    np.testing.assert_allclose(out.astype(jnp.float32), ref.astype(jnp.float32), atol=2e-2)


def test_ranges_cover_only_neighbouring_blocks():
    """Windows of <= 64 positions in blocks of 64: each query block visits at most 3 key blocks."""
    rng = np.random.default_rng(3)
    seg = jnp.asarray(_runs(rng, 64 * 32, 64)[None])
    lo, hi = block_ranges(seg, seg, 64, 64)
    blocks = np.arange(32)
    assert (np.asarray(lo) <= blocks).all() and (blocks < np.asarray(hi)).all()
    assert int((hi - lo).max()) <= 3


def test_dispatch_and_its_errors():
    rng = np.random.default_rng(4)
    q, k, v = _qkv(rng, 1, 70, 2, 2, 4)
    seg = jnp.asarray(_runs(rng, 70, 9)[None])
    np.testing.assert_allclose(
        jax.jit(lambda q, k, v: attention(q, k, v, segment_ids=seg, impl="xla", block_sparse=True))(q, k, v),
        attention_reference(q, k, v, segment_ids=seg),
        atol=2e-6,
    )
    with pytest.raises(ValueError, match="block_sparse needs self-attention segment_ids"):
        attention(q, k, v, segment_ids=seg, causal=True, impl="xla", block_sparse=True)
    with pytest.raises(ValueError, match="block_sparse needs"):
        attention(q, k, v, impl="xla", block_sparse=True)


def _temp_bytes(fn, t: int, heads: int = 4, d: int = 16) -> int:
    """Compiled (CPU) temporaries of value_and_grad of `fn` at sequence length t, windows of 64."""
    spec = jax.ShapeDtypeStruct((1, t, heads, d), jnp.float32)
    seg = jnp.asarray(_runs(np.random.default_rng(0), t, 64)[None])

    def loss(q, k, v):
        return fn(q, k, v, seg).sum()

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(spec, spec, spec).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_temporaries_grow_linearly_not_quadratically():
    """4x the positions: the blocked path's temporaries grow ~4x, the dense path's ~16x (control)."""

    def blocked(q, k, v, seg):
        return blocked_attention(q, k, v, seg)

    def dense(q, k, v, seg):
        return attention_reference(q, k, v, segment_ids=seg)

    small, large = 1024, 4096
    dense_large, blocked_large = _temp_bytes(dense, large), _temp_bytes(blocked, large)
    assert dense_large / _temp_bytes(dense, small) > 12
    assert blocked_large / _temp_bytes(blocked, small) < 5
    assert blocked_large < dense_large / 8

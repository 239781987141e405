"""Threefry-2x32 random bits with the rounds unrolled, bit-identical to JAX's default PRNG.

On CPU, JAX lowers Threefry as a rolled loop over its five groups of rounds (it compiles faster), so
each group writes and reads back the whole `uint32` counter arrays: drawing the Gumbel noise of one
decode step over Qwen's 151,936-token vocabulary for 16 rows (2.4 M numbers) with
`jax.random.categorical` took ~120 CPU-ms, most of an RL rollout's cost with the demo's tiny model.
Unrolled (as JAX lowers it for TPU and GPU), XLA fuses the rounds with the uniform → Gumbel → argmax
chain that follows into one pass over the vocabulary.

`UNROLLED_THREEFRY` is a PRNG implementation with JAX's threefry seed, split and fold-in and these
bits: a key of it (`as_unrolled(key)`, same key data) draws exactly the numbers the default key
draws from every `jax.random` sampler (JAX's partitionable counter layout, its default since 0.5;
under `jax_threefry_partitionable=False`, or for other widths and sizes, the default's own bits).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.random import define_prng_impl, threefry_prng_impl

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)


def threefry2x32(k1: jax.Array, k2: jax.Array, x1: jax.Array, x2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Threefry-2x32 with 20 rounds (Salmon et al., SC 2011) of the counter words `(x1, x2)` under the
    key `(k1, k2)`, all uint32, unrolled: one elementwise expression for XLA to fuse."""
    ks = (k1, k2, k1 ^ k2 ^ _PARITY)
    x1, x2 = x1 + ks[0], x2 + ks[1]
    for group in range(5):
        for r in _ROTATIONS[group % 2]:
            x1 = x1 + x2
            x2 = ((x2 << np.uint32(r)) | (x2 >> np.uint32(32 - r))) ^ x1
        x1 = x1 + ks[(group + 1) % 3]
        x2 = x2 + ks[(group + 2) % 3] + np.uint32(group + 1)
    return x1, x2


def _random_bits(key: jax.Array, bit_width: int, shape: tuple[int, ...]) -> jax.Array:
    """JAX's partitionable threefry bits: the 64-bit row-major index of each element as the counter
    (high word 0 below 2**32 elements), the two output words xor-ed."""
    size = math.prod(shape)
    if bit_width != 32 or size >= 2**32 or not jax.config.jax_threefry_partitionable:
        return threefry_prng_impl.random_bits(key, bit_width, shape)
    counts = jax.lax.iota(np.uint32, size).reshape(shape)
    bits1, bits2 = threefry2x32(key[0], key[1], jnp.zeros_like(counts), counts)
    return bits1 ^ bits2


UNROLLED_THREEFRY = define_prng_impl(
    key_shape=(2,),
    seed=threefry_prng_impl.seed,
    split=threefry_prng_impl.split,
    random_bits=_random_bits,
    fold_in=threefry_prng_impl.fold_in,
    name="threefry2x32_unrolled",
    tag="fry_unrolled",
)


def as_unrolled(key: jax.Array) -> jax.Array:
    """A default-threefry key (typed, or raw `uint32[2]` data) as the same key of
    `UNROLLED_THREEFRY`; a key of another implementation unchanged."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if jax.random.key_impl(key) != jax.random.key_impl(jax.random.key(0)) or "threefry" not in str(
            jax.random.key_impl(key)
        ):
            return key
        key = jax.random.key_data(key)
    return jax.random.wrap_key_data(key, impl=UNROLLED_THREEFRY)

"""Building blocks shared by the Flax NNX models: every parameter carries logical axis names.

Kernels are stored `[in, out]` (Flax convention); checkpoint converters transpose PyTorch's
`[out, in]`. Parameters are created in `param_dtype` (float32 master weights) and cast to the
module's compute `dtype` at use.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

Axes = tuple[str | None, ...]
Initializer = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]


def path_str(path: tuple) -> str:
    """A variable's path in its model as a dotted name: `model.layers.0.mlp.up_proj.kernel`."""
    return ".".join(str(p) for p in path)


def param(
    rngs: nnx.Rngs, init: Initializer, shape: tuple[int, ...], axes: Axes, dtype=jnp.float32
) -> nnx.Param:
    """A parameter annotated with logical axis names (one per dimension)."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match parameter shape {shape}")
    return nnx.Param(init(next_key(rngs.params), shape, dtype), eager_sharding=False, out_sharding=axes)


def next_key(stream: nnx.RngStream) -> jax.Array:
    """`stream()`: the same key, the same count update. Under tracing (`nnx.eval_shape`, `jax.jit` of
    an init) `stream()` writes its count with `count[...] = ...`, whose check for a full replace
    asks the traced count for its `.sharding`; a tracer answers with an error message that walks
    the whole program traced so far, so a model's construction took time quadratic in its number
    of parameters (7B under `eval_shape`: ~13 of 16 CPU-s). Setting the value whole skips it."""
    count = stream.count.get_value()
    if not isinstance(count, jax.core.Tracer):
        return stream()
    key = jax.random.fold_in(stream.key.get_value(), count)
    stream.count.set_value(count + 1)
    return key


class Linear(nnx.Module):
    """`y = x @ kernel + bias` with kernel `[in, out]` on logical axes `axes`."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool,
        axes: tuple[str | None, str | None],
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        stddev: float = 0.02,
    ):
        self.dtype = dtype
        self.kernel = param(
            rngs, nnx.initializers.normal(stddev), (in_features, out_features), axes, param_dtype
        )
        self.bias = (
            param(rngs, nnx.initializers.zeros, (out_features,), (axes[1],), param_dtype)
            if use_bias
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class RMSNorm(nnx.Module):
    """Qwen2 RMSNorm: normalise in float32, scale by `weight`, return in the input dtype."""

    def __init__(self, dim: int, *, eps: float, axis: str | None, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.eps = eps
        self.weight = param(rngs, nnx.initializers.ones, (dim,), (axis,), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(dtype) * x.astype(dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with `weight` and `bias` (CLIP), statistics in float32."""

    def __init__(self, dim: int, *, eps: float, axis: str | None, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.eps = eps
        self.weight = param(rngs, nnx.initializers.ones, (dim,), (axis,), param_dtype)
        self.bias = param(rngs, nnx.initializers.zeros, (dim,), (axis,), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight[...] + self.bias[...]).astype(dtype)


class Embed(nnx.Module):
    """Token embedding table `[vocab, embed]`; `attend` gives logits against the same table."""

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        self.dtype = dtype
        self.embedding = param(
            rngs, nnx.initializers.normal(0.02), (num_embeddings, features), ("vocab", "embed"), param_dtype
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        return jnp.dot(x.astype(self.dtype), self.embedding[...].astype(self.dtype).T)

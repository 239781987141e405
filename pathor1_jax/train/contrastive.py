"""PathoCLIP's contrastive objective: symmetric InfoNCE over the global batch.

`clip_loss` is the single-device definition. `sharded_clip_loss` computes the same number on a
mesh whose batch axes split the rows: inside `shard_map` each shard all-gathers the other tower's
normalised embeddings, scores its own rows against the whole global batch (memory O(local ×
global)), and the per-row losses are summed across shards. Gradients flow back through the
all-gather (its transpose is a reduce-scatter), so they equal the single-device gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from pathor1_jax.logical import axis_names


def _normalize(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _row_losses(queries: jax.Array, keys: jax.Array, scale: jax.Array, offset: jax.Array) -> jax.Array:
    """−log softmax of each query's own key among all keys: `[n]` for queries `[n, P]`, keys `[N, P]`."""
    logits = scale * queries @ keys.T  # [n, N]
    targets = offset + jnp.arange(queries.shape[0])
    return jax.nn.logsumexp(logits, axis=-1) - logits[jnp.arange(queries.shape[0]), targets]


def clip_loss(image_embeds: jax.Array, text_embeds: jax.Array, logit_scale: jax.Array) -> jax.Array:
    """Mean over both directions of the cross-entropy of matching pairs, logits `exp(logit_scale)·cos`.

    image_embeds, text_embeds: `[N, P]` projected features (row i of each is a pair).
    """
    img, txt = _normalize(image_embeds), _normalize(text_embeds)
    scale = jnp.exp(logit_scale.astype(jnp.float32))
    zero = jnp.zeros((), jnp.int32)
    return 0.5 * (_row_losses(img, txt, scale, zero).mean() + _row_losses(txt, img, scale, zero).mean())


def sharded_clip_loss(
    image_embeds: jax.Array,
    text_embeds: jax.Array,
    logit_scale: jax.Array,
    mesh: Mesh,
    batch_axes: str | Sequence[str],
) -> jax.Array:
    """`clip_loss` of the global batch whose rows are split over `batch_axes` of `mesh`."""
    axes = axis_names(batch_axes)
    rows = PartitionSpec(axes)

    def local(img, txt, scale):
        img, txt = _normalize(img), _normalize(txt)
        scale = jnp.exp(scale.astype(jnp.float32))
        all_img = jax.lax.all_gather(img, axes, tiled=True)  # [N, P]
        all_txt = jax.lax.all_gather(txt, axes, tiled=True)
        offset = jax.lax.axis_index(axes) * img.shape[0]
        total = (
            _row_losses(img, all_txt, scale, offset).sum() + _row_losses(txt, all_img, scale, offset).sum()
        )
        return jax.lax.psum(total, axes) / (2 * all_img.shape[0])

    return jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, PartitionSpec()), out_specs=PartitionSpec())(
        image_embeds, text_embeds, logit_scale
    )

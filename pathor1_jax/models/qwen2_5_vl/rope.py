"""Rotary position embeddings of Qwen2.5-VL.

- Text: multimodal RoPE (M-RoPE). Positions are `[3, B, T]` (temporal, height, width); the
  rotary frequencies are split into `mrope_section` chunks and chunk i rotates by axis i % 3.
  `get_rope_index` computes the positions on the host, with Hugging Face's semantics.
- Vision: 2D axial RoPE over (row, column) patch coordinates (see `vision.py` for positions).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from .config import Qwen2_5_VLConfig


def rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def text_rope(
    position_ids: jax.Array, head_dim: int, theta: float, mrope_section: tuple[int, ...]
) -> tuple[jax.Array, jax.Array]:
    """cos/sin `[B, T, head_dim]` (float32) for M-RoPE positions `[3, B, T]`."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))  # [hd/2]
    freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq  # [3, B, T, hd/2]
    bounds = np.cumsum(mrope_section)[:-1].tolist()
    chunks = jnp.split(freqs, bounds, axis=-1)
    freqs = jnp.concatenate([chunk[i % 3] for i, chunk in enumerate(chunks)], axis=-1)  # [B, T, hd/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, hd]
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x `[B, T, H, D]` by cos/sin `[B, T, D]`."""
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotate_half(x) * sin


def vision_rope(rotary_pos_ids: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin `[N, head_dim]` (float32) for (row, column) patch coordinates `[N, 2]`."""
    spatial_dim = head_dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, spatial_dim, 2, dtype=jnp.float32) / spatial_dim))  # [hd/4]
    freqs = rotary_pos_ids.astype(jnp.float32)[..., None] * inv_freq  # [N, 2, hd/4]
    freq_hw = freqs.reshape(freqs.shape[0], -1)  # [N, hd/2]: rows then columns
    emb = jnp.concatenate([freq_hw, freq_hw], axis=-1)  # [N, hd]
    return jnp.cos(emb), jnp.sin(emb)


def apply_vision_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x `[N, H, D]` in float32 (as the reference does), return in x's dtype."""
    xf = x.astype(jnp.float32)
    out = xf * cos[:, None, :] + rotate_half(xf) * sin[:, None, :]
    return out.astype(x.dtype)


def get_rope_index(
    input_ids: np.ndarray,
    image_grid_thw: np.ndarray | None,
    attention_mask: np.ndarray | None,
    mm_token_type_ids: np.ndarray | None,
    config: Qwen2_5_VLConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """M-RoPE positions `[3, B, T]` and rope deltas `[B, 1]`, as HF's `get_rope_index`.

    Text runs advance all three axes together; an image of grid (t, h, w) takes
    `t · h/m · w/m` positions `(start + t_i, start + h_i, start + w_i)` and advances the running
    position by `max(h, w) / m`. Padding (attention_mask == 0) keeps position 0. Without
    `mm_token_type_ids` or image grids this falls back to the 1D positions HF uses: `arange(T)`
    on all three axes, deltas 0.
    """
    input_ids = np.asarray(input_ids)
    b, t = input_ids.shape
    if mm_token_type_ids is None or image_grid_thw is None:
        positions = np.broadcast_to(np.arange(t, dtype=np.int32), (3, b, t)).copy()
        return positions, np.zeros((b, 1), dtype=np.int32)
    merge = config.vision.spatial_merge_size
    token_types = np.asarray(mm_token_type_ids)
    mask = (
        np.ones_like(input_ids, dtype=bool)
        if attention_mask is None
        else np.asarray(attention_mask).astype(bool)
    )
    grids = iter(np.asarray(image_grid_thw).tolist())
    positions = np.zeros((3, b, t), dtype=np.int32)
    deltas = np.zeros((b, 1), dtype=np.int32)
    for row in range(b):
        types = token_types[row][mask[row]]
        pieces = []
        current = 0
        for modality, group in itertools.groupby(types.tolist()):
            length = len(list(group))
            if modality == 0:
                pieces.append(np.broadcast_to(np.arange(length) + current, (3, length)))
                current += length
                continue
            if modality != 1:
                raise ValueError(
                    f"mm_token_type_ids: only text (0) and image (1) are supported, got {modality}"
                )
            try:
                grid_t, grid_h, grid_w = next(grids)
            except StopIteration:
                raise ValueError("mm_token_type_ids mark more images than image_grid_thw has rows") from None
            gt, gh, gw = grid_t, grid_h // merge, grid_w // merge
            if gt * gh * gw != length:
                raise ValueError(
                    f"image in row {row} has {length} image tokens but its grid {[grid_t, grid_h, grid_w]} "
                    f"needs {gt * gh * gw}"
                )
            tt, hh, ww = np.meshgrid(np.arange(gt), np.arange(gh), np.arange(gw), indexing="ij")
            pieces.append(np.stack([tt, hh, ww]).reshape(3, -1) + current)
            current += max(grid_h, grid_w) // merge
        llm_positions = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), dtype=np.int32)
        positions[:, row, mask[row]] = llm_positions
        deltas[row, 0] = (llm_positions.max() + 1 if llm_positions.size else 0) - int(mask[row].sum())
    return positions, deltas

"""Host-side index bookkeeping of the Qwen2.5-VL vision tower (numpy, computed from `grid_thw`).

The vision tower sees all patches of all images as one sequence `[N, 1176]`. Window attention
reorders patches so that each window is contiguous (`window_index`, in units of 2×2 merge groups),
and every block attends within a segment: a window (`window_segment_ids`) or, in the
`fullatt_block_indexes` blocks, a whole image frame (`frame_segment_ids`). Padding patches (for
fixed shapes under jit) get segment id 0 and stay in place.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from .config import VisionConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VisionIndex:
    window_index: jax.Array  # [N / merge²] merge-group permutation into window order
    window_segment_ids: jax.Array  # [N] per patch, window order; 0 = padding
    frame_segment_ids: jax.Array  # [N] per patch, window order; 0 = padding
    rotary_pos_ids: jax.Array  # [N, 2] (row, column) per patch, original order


def num_image_tokens(image_grid_thw: np.ndarray, spatial_merge_size: int) -> np.ndarray:
    """Tokens each image occupies in the text: `t · h · w / merge²`."""
    grid = np.asarray(image_grid_thw).reshape(-1, 3)
    return grid.prod(axis=-1) // (spatial_merge_size**2)


def vision_index(
    image_grid_thw: np.ndarray, config: VisionConfig, num_patches: int | None = None
) -> VisionIndex:
    """Window order, segment ids and rotary coordinates for images of grids `[N_img, 3]`.

    num_patches: pad the bookkeeping to this many patches (a multiple of merge²); None = exact.
    Rows of `[0, 0, 0]` (padding of a fixed-size grid array) are skipped.
    """
    merge = config.spatial_merge_size
    unit = merge * merge
    window = config.window_size // merge // config.patch_size  # window side in merge groups
    grids = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
    window_index, window_seg, frame_seg, rotary = [], [], [], []
    group_offset, window_id, frame_id = 0, 0, 0
    for t, h, w in grids.tolist():
        if t * h * w == 0:
            continue
        if h % merge or w % merge:
            raise ValueError(f"image grid {[t, h, w]} is not a multiple of spatial_merge_size {merge}")
        gh, gw = h // merge, w // merge
        groups = np.arange(t * gh * gw).reshape(t, gh, gw)
        nh, nw = -(-gh // window), -(-gw // window)
        padded = np.full((t, nh * window, nw * window), -1)
        padded[:, :gh, :gw] = groups
        padded = padded.reshape(t, nh, window, nw, window).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, -1)
        for frame in padded:
            for win in frame:
                members = win[win >= 0]
                if members.size == 0:
                    continue
                window_id += 1
                window_index.append(members + group_offset)
                window_seg.append(np.full(members.size * unit, window_id))
        for _ in range(t):
            frame_id += 1
            frame_seg.append(np.full(h * w, frame_id))
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        block = (gh, merge, gw, merge)
        rows = rows.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
        cols = cols.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
        rotary.append(np.tile(np.stack([rows, cols], axis=-1), (t, 1)))
        group_offset += t * gh * gw
    total = group_offset * unit
    if num_patches is None:
        num_patches = total
    if num_patches < total or num_patches % unit:
        raise ValueError(
            f"num_patches={num_patches} must be a multiple of {unit} and >= the {total} real patches"
        )
    pad_groups = (num_patches - total) // unit
    pad = num_patches - total

    def cat(parts, tail, dtype=np.int32):
        return np.concatenate([*parts, tail]).astype(dtype)

    return VisionIndex(
        window_index=cat(window_index, np.arange(group_offset, group_offset + pad_groups)),
        window_segment_ids=cat(window_seg, np.zeros(pad)),
        frame_segment_ids=cat(frame_seg, np.zeros(pad)),
        rotary_pos_ids=np.concatenate([*rotary, np.zeros((pad, 2))]).astype(np.int32),
    )

"""Qwen2.5-VL as a causal LM on packed batches: the host-side batch preparation and the per-token
NLL shared by CPT and SFT (the stages differ in their data: which tokens carry labels).

A packed batch from `pathor1_jax.data` (see `data/packing.py`) has `input_ids`, `labels`,
`segment_ids`, `position_ids [3, B, T]`, `pixel_values [P, 1176]` and `image_grid_thw [N, 3]`
(zero rows pad to a fixed N). `prepare_batch` turns the grids into the vision tower's index
bookkeeping (`VisionIndex`, fixed shapes for a fixed P) on the host, so the jitted step sees only
arrays of fixed shapes.
"""

from __future__ import annotations

import jax
import numpy as np

from pathor1_jax.kernels.policy_loss import CHUNKED_VOCAB_TILE
from pathor1_jax.logical import batch_parts, current_rules
from pathor1_jax.models import qwen2_5_vl
from pathor1_jax.train.losses import per_token_nll, shifted_targets

MODEL_INPUTS = ("input_ids", "labels", "segment_ids", "position_ids", "pixel_values")


def prepare_batch(batch: dict, config: qwen2_5_vl.Qwen2_5_VLConfig) -> dict:
    """Packed batch (numpy) → the step's inputs: token arrays, pixel patches, `vision_index` and
    `image_feature_index` (the row of the vision output each image-pad token takes, -1 elsewhere)."""
    missing = [k for k in (*MODEL_INPUTS, "image_grid_thw") if k not in batch]
    if missing:
        raise ValueError(f"batch lacks field(s) {missing}; it has {sorted(batch)}")
    grid = np.asarray(batch["image_grid_thw"]).reshape(-1, 3)
    grid = grid[grid.prod(axis=-1) > 0]  # drop the padding rows
    num_patches = int(np.asarray(batch["pixel_values"]).shape[0])
    out = {k: np.asarray(batch[k]) for k in MODEL_INPUTS}
    out["vision_index"] = qwen2_5_vl.vision_index(grid, config.vision, num_patches)
    is_image = out["input_ids"] == config.image_token_id
    order = np.cumsum(is_image.reshape(-1)).reshape(is_image.shape) - 1
    out["image_feature_index"] = np.where(is_image, order, -1).astype(np.int32)
    return out


def offset_to_block(micro: dict, block: int, merge_unit: int) -> dict:
    """A process's prepared micro-batch numbered as block `block` of the global batch.

    Across processes the pixel patches of the global batch are the processes' blocks in order, so
    this process's merge groups, segment ids and feature rows shift by `block` blocks; segment id 0
    (padding) stays 0.
    """
    num_patches = micro["pixel_values"].shape[-2]
    index = micro["vision_index"]

    def shift_segments(ids):
        return np.where(ids > 0, ids + block * num_patches, 0).astype(ids.dtype)

    groups = block * (num_patches // merge_unit)
    return {
        **micro,
        "vision_index": qwen2_5_vl.VisionIndex(
            window_index=index.window_index + groups,
            window_segment_ids=shift_segments(index.window_segment_ids),
            frame_segment_ids=shift_segments(index.frame_segment_ids),
            rotary_pos_ids=index.rotary_pos_ids,
        ),
        "image_feature_index": np.where(
            micro["image_feature_index"] >= 0, micro["image_feature_index"] + groups, -1
        ).astype(np.int32),
    }


def lm_nll(
    model: qwen2_5_vl.Qwen2_5_VLForConditionalGeneration, micro: dict, chunk: int = 64
) -> tuple[jax.Array, jax.Array]:
    """Per-token NLL `[B, T]` of the next token (computed only where valid, 0 elsewhere) and its
    validity mask (labels != -100, same segment). The LM head's positions are gathered per block of
    rows that one device holds (the batch's shards in the current `use_rules` context; all rows
    outside one), `chunk` per row at a time; on one device the head is taken `CHUNKED_VOCAB_TILE`
    columns at a time (a block of logits that stays in cache), on a mesh whole (partitioned as the
    head is)."""
    hidden = model.hidden_states(
        micro["input_ids"],
        pixel_values=micro["pixel_values"],
        position_ids=micro["position_ids"],
        segment_ids=micro["segment_ids"],
        vision_index=micro["vision_index"],
        image_feature_index=micro["image_feature_index"],
    )  # [B, T, D]
    targets, valid = shifted_targets(micro["labels"], micro["segment_ids"])
    ctx = current_rules()
    groups = 1 if ctx is None else batch_parts(*ctx)
    head = model.lm_head_kernel().astype(model.dtype)  # [D, V], as `model.logits` computes
    one_device = ctx is None or ctx[0].size == 1
    tile = CHUNKED_VOCAB_TILE if one_device else head.shape[1]
    nll = per_token_nll(hidden.astype(model.dtype), head, targets, chunk, valid, groups, tile)
    return nll, valid

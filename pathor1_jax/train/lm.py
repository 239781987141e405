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

from pathor1_jax.models import qwen2_5_vl
from pathor1_jax.train.losses import per_token_nll, shifted_targets

MODEL_INPUTS = ("input_ids", "labels", "segment_ids", "position_ids", "pixel_values")


def prepare_batch(batch: dict, config: qwen2_5_vl.Qwen2_5_VLConfig) -> dict:
    """Packed batch (numpy) → the step's inputs: token arrays, pixel patches and `vision_index`."""
    missing = [k for k in (*MODEL_INPUTS, "image_grid_thw") if k not in batch]
    if missing:
        raise ValueError(f"batch lacks field(s) {missing}; it has {sorted(batch)}")
    grid = np.asarray(batch["image_grid_thw"]).reshape(-1, 3)
    grid = grid[grid.prod(axis=-1) > 0]  # drop the padding rows
    num_patches = int(np.asarray(batch["pixel_values"]).shape[0])
    out = {k: np.asarray(batch[k]) for k in MODEL_INPUTS}
    out["vision_index"] = qwen2_5_vl.vision_index(grid, config.vision, num_patches)
    return out


def lm_nll(
    model: qwen2_5_vl.Qwen2_5_VLForConditionalGeneration, micro: dict, chunk: int = 256
) -> tuple[jax.Array, jax.Array]:
    """Per-token NLL `[B, T]` of the next token and its validity mask (labels != -100, same segment)."""
    hidden = model.hidden_states(
        micro["input_ids"],
        pixel_values=micro["pixel_values"],
        position_ids=micro["position_ids"],
        segment_ids=micro["segment_ids"],
        vision_index=micro["vision_index"],
    )  # [B, T, D]
    targets, valid = shifted_targets(micro["labels"], micro["segment_ids"])
    return per_token_nll(hidden, model.logits, targets, chunk), valid

"""Fitting examples to `max_len` and packing them into fixed-shape batches.

A batch (all numpy):
    input_ids          [B, T] int32   padding = the tokenizer's pad id
    labels             [B, T] int32   -100 = no loss (HF convention: logits[t] predicts labels[t + 1])
    segment_ids        [B, T] int32   1, 2, ... per packed sample in a row; 0 = padding
    position_ids       [3, B, T] int32  M-RoPE positions of each sample, restarting at every segment
    mm_token_type_ids  [B, T] int32   1 at image-pad tokens
    pixel_values       [P, 1176] float32  patches of all images in row-major token order; zero rows pad
                                       to `max_patches` when set
    image_grid_thw     [N, 3] int32   grids in the same order; `[0, 0, 0]` rows pad to `max_images`
    loss_mask          [B, T] float32  1.0 where labels != -100

Every sample starts with a non-loss token (`<|im_start|>`), so the shifted loss never crosses a
segment boundary. Padding images occupy no tokens and no patches: a model computes the vision
features of the real patches only (`vision_index(real_grids(image_grid_thw), num_patches=P)` marks
the rest as padding, segment 0) and the k-th image-pad token takes the k-th merged feature.
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np

from .processing import IGNORE_INDEX, PATCH_DIM

log = logging.getLogger(__name__)

OVERFLOW_POLICIES = ("truncate", "drop")


def real_grids(image_grid_thw: np.ndarray) -> np.ndarray:
    """The grid rows of real images (drops the `[0, 0, 0]` padding rows)."""
    grid = np.asarray(image_grid_thw).reshape(-1, 3)
    return grid[grid.prod(axis=-1) > 0]


def image_spans(example: dict[str, np.ndarray]) -> list[tuple[int, int]]:
    """`[start, end)` token spans of each image's pad run, in order."""
    mm = example["mm_token_type_ids"].astype(bool)
    edges = np.flatnonzero(np.diff(np.concatenate([[False], mm, [False]]).astype(np.int8)))
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist(), strict=True))


def fit_to_length(example: dict[str, np.ndarray], max_len: int, policy: str) -> tuple[dict | None, str]:
    """Apply the overflow policy to one example; returns `(example or None, reason)`.

    `drop` drops any example longer than `max_len`. `truncate` cuts it to `max_len` tokens, keeping
    only the images whose pad tokens lie entirely before the cut; a cut through an image's pad
    tokens drops the example instead (its features could not be placed), and so does a cut that
    leaves no loss tokens.
    """
    if policy not in OVERFLOW_POLICIES:
        raise ValueError(f"overflow policy must be one of {OVERFLOW_POLICIES}, got {policy!r}")
    length = example["input_ids"].shape[0]
    if length <= max_len:
        return example, ""
    if policy == "drop":
        return None, f"longer than max_len={max_len} ({length} tokens)"
    spans = image_spans(example)
    if any(start < max_len < end for start, end in spans):
        return None, f"truncation at max_len={max_len} would cut through an image ({length} tokens)"
    if not (example["labels"][:max_len] != IGNORE_INDEX).any():
        return None, f"truncation at max_len={max_len} leaves no loss tokens ({length} tokens)"
    kept = sum(end <= max_len for _, end in spans)
    grid = example["image_grid_thw"][:kept]
    patches = int(grid.prod(axis=-1).sum()) if kept else 0
    return {
        "input_ids": example["input_ids"][:max_len],
        "labels": example["labels"][:max_len],
        "mm_token_type_ids": example["mm_token_type_ids"][:max_len],
        "position_ids": example["position_ids"][:, :max_len],
        "pixel_values": example["pixel_values"][:patches],
        "image_grid_thw": grid,
    }, ""


def unbatchable(example: dict, max_len: int, max_patches: int | None, max_images: int | None) -> str:
    """Why `example` can never be in a batch of these limits ("" if it can)."""
    if example["input_ids"].shape[0] > max_len:
        return f"longer than max_len={max_len}"
    if max_patches is not None and example["pixel_values"].shape[0] > max_patches:
        return f"{example['pixel_values'].shape[0]} patches > max_patches={max_patches}"
    if max_images is not None and example["image_grid_thw"].shape[0] > max_images:
        return f"{example['image_grid_thw'].shape[0]} images > max_images={max_images}"
    return ""


class BatchPacker:
    """Greedy next-fit packing of examples into `batch_size` rows of `max_len` tokens.

    `add(example)` appends to the current row, opens the next row when it does not fit, and returns
    False when the batch is full (by rows, `max_patches` or `max_images`); `batch()` emits it.
    With `packing=False` every row holds one example.
    """

    def __init__(
        self,
        *,
        batch_size: int,
        max_len: int,
        pad_token_id: int,
        packing: bool = True,
        max_patches: int | None = None,
        max_images: int | None = None,
    ):
        self.batch_size, self.max_len, self.pad_token_id = batch_size, max_len, pad_token_id
        self.packing, self.max_patches, self.max_images = packing, max_patches, max_images
        self.rows: list[list[dict]] = [[]]
        self.lengths = [0]
        self.patches = 0
        self.images = 0

    def fits_alone(self, example: dict) -> str:
        """Why `example` can never be batched ("" if it can)."""
        return unbatchable(example, self.max_len, self.max_patches, self.max_images)

    def empty(self) -> bool:
        return self.lengths[0] == 0

    def add(self, example: dict) -> bool:
        length = example["input_ids"].shape[0]
        patches = self.patches + example["pixel_values"].shape[0]
        images = self.images + example["image_grid_thw"].shape[0]
        if (self.max_patches is not None and patches > self.max_patches) or (
            self.max_images is not None and images > self.max_images
        ):
            return False
        row_open = self.lengths[-1] == 0 or (self.packing and self.lengths[-1] + length <= self.max_len)
        if not row_open:
            if len(self.rows) == self.batch_size:
                return False
            self.rows.append([])
            self.lengths.append(0)
        self.rows[-1].append(example)
        self.lengths[-1] += length
        self.patches, self.images = patches, images
        return True

    def batch(self) -> dict[str, np.ndarray]:
        b, t = self.batch_size, self.max_len
        out = {
            "input_ids": np.full((b, t), self.pad_token_id, np.int32),
            "labels": np.full((b, t), IGNORE_INDEX, np.int32),
            "segment_ids": np.zeros((b, t), np.int32),
            "position_ids": np.zeros((3, b, t), np.int32),
            "mm_token_type_ids": np.zeros((b, t), np.int32),
        }
        pixels, grids = [], []
        for r, row in enumerate(self.rows):
            offset = 0
            for s, ex in enumerate(row, start=1):
                n = ex["input_ids"].shape[0]
                window = slice(offset, offset + n)
                out["input_ids"][r, window] = ex["input_ids"]
                out["labels"][r, window] = ex["labels"]
                out["segment_ids"][r, window] = s
                out["position_ids"][:, r, window] = ex["position_ids"]
                out["mm_token_type_ids"][r, window] = ex["mm_token_type_ids"]
                pixels.append(ex["pixel_values"])
                grids.append(ex["image_grid_thw"])
                offset += n
        pixel_values = np.concatenate(pixels + [np.zeros((0, PATCH_DIM), np.float32)]).astype(np.float32)
        grid = np.concatenate(grids + [np.zeros((0, 3), np.int32)]).astype(np.int32)
        if self.max_patches is not None:
            pixel_values = np.pad(pixel_values, ((0, self.max_patches - pixel_values.shape[0]), (0, 0)))
        if self.max_images is not None:
            grid = np.pad(grid, ((0, self.max_images - grid.shape[0]), (0, 0)))
        out["pixel_values"] = pixel_values
        out["image_grid_thw"] = grid
        out["loss_mask"] = (out["labels"] != IGNORE_INDEX).astype(np.float32)
        return out


def pack_examples(examples: list[dict], **packer_kwargs) -> list[dict[str, np.ndarray]]:
    """All examples packed into batches, in order (a pure helper for tests and offline use)."""
    batches = []
    packer = BatchPacker(**packer_kwargs)
    for ex in examples:
        reason = packer.fits_alone(ex)
        if reason:
            raise ValueError(f"example cannot be batched: {reason}")
        if not packer.add(ex):
            batches.append(packer.batch())
            packer = BatchPacker(**packer_kwargs)
            packer.add(ex)
    if not packer.empty():
        batches.append(packer.batch())
    return batches


class DropCounter:
    """Counts dropped / skipped records by kind; logs the first `LOGGED` of each kind, then one line
    at every power of two of its count (a stream of bad records logs a few lines, not megabytes)."""

    LOGGED = 10

    def __init__(self, counts: dict[str, int] | None = None):
        self.counts: Counter[str] = Counter(counts or {})

    def drop(self, kind: str, record_id: str, reason: str) -> None:
        self.counts[kind] += 1
        n = self.counts[kind]
        if n <= self.LOGGED or n & (n - 1) == 0:
            log.warning("%s record %r: %s (%d %s so far)", kind, record_id, reason, n, kind)

"""Splitting a composite figure into panels by row/column projection, and reading panel letters.

`split_panels(rgb)` cuts recursively (XY-cut): at each level it looks for *separators*, runs of
rows or columns that are uniform across the whole extent of the current box (a white gutter, or a
black/grey separator line: per-line standard deviation < `flat_std` and mean > `white` or
< `dark`), trims uniform margins, and recurses into the pieces on the other axis until nothing
splits. Pieces smaller than `min_frac` of the figure's side are not panels (a thin stripe).
Thresholds are ours, tuned on the generated book and the study's textbook page.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, end-exclusive


@dataclasses.dataclass(frozen=True)
class SplitConfig:
    flat_std: float = 6.0  # a separator line's grey-level standard deviation is below this
    white: float = 235.0  # ... and its mean above this (gutter) ...
    dark: float = 60.0  # ... or below this (separator line)
    min_gap: int = 3  # pixels: narrower uniform runs are not separators
    min_frac: float = 0.12  # a panel is at least this fraction of the figure's side


def _uniform(gray: np.ndarray, axis: int, cfg: SplitConfig) -> np.ndarray:
    """Per line along `axis` (0: each column, 1: each row): is it a uniform separator line?"""
    std, mean = gray.std(axis=axis), gray.mean(axis=axis)
    return (std < cfg.flat_std) & ((mean > cfg.white) | (mean < cfg.dark))


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) runs of True."""
    padded = np.concatenate([[False], mask, [False]])
    edges = np.flatnonzero(np.diff(padded.astype(np.int8)))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def _trim(gray: np.ndarray, box: Box, cfg: SplitConfig) -> Box | None:
    x0, y0, x1, y1 = box
    region = gray[y0:y1, x0:x1]
    cols = np.flatnonzero(~_uniform(region, 0, cfg))
    rows = np.flatnonzero(~_uniform(region, 1, cfg))
    if cols.size == 0 or rows.size == 0:
        return None
    return x0 + int(cols[0]), y0 + int(rows[0]), x0 + int(cols[-1]) + 1, y0 + int(rows[-1]) + 1


def _cut(gray: np.ndarray, box: Box, axis: int, cfg: SplitConfig, min_side: int) -> list[Box]:
    """Pieces of `box` cut at interior separator runs along `axis` (0: vertical cuts)."""
    x0, y0, x1, y1 = box
    region = gray[y0:y1, x0:x1]
    mask = _uniform(region, axis, cfg)
    length = mask.size
    cuts = [(s, e) for s, e in _runs(mask) if e - s >= cfg.min_gap and s > 0 and e < length]
    bounds, start = [], 0
    for s, e in cuts:
        if s - start >= min_side:
            bounds.append((start, s))
            start = e
    if length - start < min_side and bounds:  # a stripe at the end: merge it into the last piece
        start = bounds.pop()[0]
    bounds.append((start, length))
    if axis == 0:
        return [(x0 + a, y0, x0 + b, y1) for a, b in bounds]
    return [(x0, y0 + a, x1, y0 + b) for a, b in bounds]


def split_panels(rgb: np.ndarray, cfg: SplitConfig = SplitConfig()) -> list[Box]:
    """Panel boxes of a figure image [H, W, 3] in reading order (rows top to bottom, left to right)."""
    gray = rgb.astype(np.float32).mean(axis=-1) if rgb.ndim == 3 else rgb.astype(np.float32)
    h, w = gray.shape
    min_side = max(8, int(cfg.min_frac * min(h, w)))

    def rec(box: Box, axis: int, tried_other: bool) -> list[Box]:
        trimmed = _trim(gray, box, cfg)
        if trimmed is None:
            return []
        pieces = _cut(gray, trimmed, axis, cfg, min_side)
        if len(pieces) == 1:
            return [trimmed] if tried_other else rec(trimmed, 1 - axis, True)
        return [p for piece in pieces for p in rec(piece, 1 - axis, False)]

    boxes = rec((0, 0, w, h), 1, False)  # rows first: a grid reads row by row
    return [b for b in boxes if b[2] - b[0] >= min_side and b[3] - b[1] >= min_side]


# ---------------------------------------------------------------------------------------------------
# Panel letters


_LETTER = re.compile(r"^[(\[]?([A-Ha-h])[)\].]?$")


def panel_letter(text: str) -> str | None:
    """`A`, `(a)`, `B.` → the upper-case letter; anything else → None."""
    m = _LETTER.match(text.strip())
    return m.group(1).upper() if m else None


def assign_letters(panels: list[Box], letters: list[tuple[str, float, float]]) -> dict[int, str] | None:
    """Panel index → letter from OCR'd single letters (letter, centre x, centre y), or None.

    A letter belongs to the panel containing its centre; of several, the one nearest the panel's
    top-left corner wins. None unless every panel gets one and no letter repeats.
    """
    best: dict[int, tuple[float, str]] = {}
    for letter, cx, cy in letters:
        for i, (x0, y0, x1, y1) in enumerate(panels):
            if x0 <= cx < x1 and y0 <= cy < y1:
                d = (cx - x0) ** 2 + (cy - y0) ** 2
                if i not in best or d < best[i][0]:
                    best[i] = (d, letter)
    out = {i: v[1] for i, v in best.items()}
    if len(out) != len(panels) or len(set(out.values())) != len(out):
        return None
    return out

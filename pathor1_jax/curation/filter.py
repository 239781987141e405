"""filter: quality rules on figure–caption pairs, then exact and near-duplicate removal.

Rules (thresholds ours, `FilterConfig`), each counted separately (a pair can break several):
- `unreadable_image`: the crop cannot be decoded;
- `too_small`: shorter side < `min_side` pixels;  `aspect`: long/short side > `max_aspect`;
- `blank`: grey-level standard deviation < `blank_std` (an empty or uniform crop);
- `mostly_white`: more than `white_frac` of the pixels are near-white (a page, not a picture);
- `colour_chart`: fewer than `min_colours` distinct colours (5 bits per channel) on a 64×64
  thumbnail: charts, diagrams, line drawings;
- `caption_short` / `caption_long`: caption words outside [`min_words`, `max_words`];
- `table_or_chart`: the caption's lead names a table, chart, graph, diagram, schematic or flowchart.
Duplicates, among pairs that pass: `duplicate_exact` (same SHA-256 of the decoded pixels) and
`duplicate_near` (64-bit difference hash within `near_bits` bits), the first in input order kept.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections import defaultdict
from typing import Any

import numpy as np
from PIL import Image

from .io import Report, Unit

_TABLE = re.compile(r"^\W*(table|chart|graph|diagram|schematic|flow ?chart|algorithm)\b", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class FilterConfig:
    min_side: int = 64
    max_aspect: float = 6.0
    blank_std: float = 8.0
    white_frac: float = 0.95
    min_colours: int = 48
    min_words: int = 3
    max_words: int = 400
    near_bits: int = 6


def dhash(gray: np.ndarray) -> int:
    """64-bit difference hash: 9×8 thumbnail, each bit = left pixel brighter than its right neighbour."""
    small = np.asarray(Image.fromarray(gray).resize((9, 8), Image.BILINEAR), dtype=np.int16)
    bits = (small[:, :-1] > small[:, 1:]).flatten()
    return int(sum(1 << i for i, b in enumerate(bits) if b))


def image_flags(rgb: np.ndarray, cfg: FilterConfig) -> list[str]:
    h, w = rgb.shape[:2]
    flags = []
    if min(h, w) < cfg.min_side:
        flags.append("too_small")
    if max(h, w) / max(1, min(h, w)) > cfg.max_aspect:
        flags.append("aspect")
    gray = rgb.mean(axis=-1)
    if gray.std() < cfg.blank_std:
        flags.append("blank")
    if (rgb.min(axis=-1) > 235).mean() > cfg.white_frac:
        flags.append("mostly_white")
    thumb = np.asarray(Image.fromarray(rgb).resize((64, 64), Image.NEAREST)) >> 3
    colours = np.unique(thumb.reshape(-1, 3).astype(np.int32) @ np.array([1024, 32, 1]))
    if colours.size < cfg.min_colours:
        flags.append("colour_chart")
    return flags


def caption_flags(caption: str, lead: str, cfg: FilterConfig) -> list[str]:
    words = len(caption.split())
    flags = []
    if words < cfg.min_words:
        flags.append("caption_short")
    if words > cfg.max_words:
        flags.append("caption_long")
    if _TABLE.match(lead or caption):
        flags.append("table_or_chart")
    return flags


def check_records(unit: Unit, cfg: FilterConfig, base_dir: str) -> tuple[list[dict[str, Any]], Report]:
    """Quality flags and hashes of each record of `unit` (the per-record half of the step)."""
    report = Report()
    out = []
    for rec in unit.payload:
        rec = dict(rec)
        path = rec["image"] if os.path.isabs(rec["image"]) else os.path.join(base_dir, rec["image"])
        flags = caption_flags(rec.get("caption", ""), rec.get("lead", ""), cfg)
        try:
            with Image.open(path) as im:
                rgb = np.asarray(im.convert("RGB"))
        except Exception as e:  # missing or corrupt crop
            report.bad("unreadable_image", rec.get("id", "?"), f"{path}: {type(e).__name__}: {e}")
            flags.append("unreadable_image")
        else:
            flags += image_flags(rgb, cfg)
            rec["image_sha256"] = hashlib.sha256(rgb.tobytes() + str(rgb.shape).encode()).hexdigest()
            rec["dhash"] = f"{dhash(rgb.mean(axis=-1).astype(np.uint8)):016x}"
        rec["image"] = os.path.abspath(path)
        rec["reasons"] = flags
        out.append(rec)
    return out, report


def dedup(records: list[dict[str, Any]], near_bits: int) -> None:
    """Mark `duplicate_exact` / `duplicate_near` in the `reasons` of later copies (in place).

    Near duplicates are found through 8 bands of 8 bits: two hashes within 7 bits share a band.
    """
    seen_exact: dict[str, str] = {}
    bands: list[dict[int, list[int]]] = [defaultdict(list) for _ in range(8)]
    kept_hashes: list[int] = []
    kept_ids: list[str] = []
    for rec in records:
        if rec["reasons"]:
            continue
        if rec["image_sha256"] in seen_exact:
            rec["reasons"].append("duplicate_exact")
            rec["duplicate_of"] = seen_exact[rec["image_sha256"]]
            continue
        h = int(rec["dhash"], 16)
        candidates = {j for b in range(8) for j in bands[b].get((h >> (8 * b)) & 0xFF, [])}
        near = [j for j in sorted(candidates) if bin(kept_hashes[j] ^ h).count("1") <= near_bits]
        if near:
            rec["reasons"].append("duplicate_near")
            rec["duplicate_of"] = kept_ids[near[0]]
            continue
        seen_exact[rec["image_sha256"]] = rec["id"]
        for b in range(8):
            bands[b][(h >> (8 * b)) & 0xFF].append(len(kept_hashes))
        kept_hashes.append(h)
        kept_ids.append(rec["id"])

"""sample: the RL MCQ set (paper §3.4) and the SFT split it must not overlap.

Candidates: QC-passed MCQ chat records of the kept subfields (diagnosis-oriented: their stem or
answer names a diagnosis, our keyword rule `DIAGNOSIS`), one per source figure (the lowest id).
Allocation, proportionate stratified: `n` is split over subfields in proportion to their
candidate counts (largest remainder), and within histopathology and gross over tissue systems
(`classify.tissue_system`) in proportion again; each stratum is drawn with a seeded RNG.
Disjointness: the SFT split is every input record whose image hash and source figure differ from
all RL items. Options are shuffled with the seed so that answer letters come out balanced: the
i-th RL item's answer goes to letter i mod (number of options), the other options in random order.
"""

from __future__ import annotations

import collections
import random
import re
from typing import Any

from .classify import KEPT, tissue_system

DIAGNOSIS = re.compile(
    r"diagnos|most likely|consistent with|what is (?:the|this) (?:lesion|tumou?r|entity)", re.I
)
TISSUE_STRATIFIED = ("histopathology", "gross")


def largest_remainder(total: int, sizes: dict[str, int]) -> dict[str, int]:
    """`total` split over keys in proportion to `sizes` (Hamilton's method; ties by key), capped by size."""
    whole = sum(sizes.values())
    if whole == 0 or total <= 0:
        return {k: 0 for k in sizes}
    total = min(total, whole)
    quotas = {k: total * v / whole for k, v in sizes.items()}
    alloc = {k: int(q) for k, q in quotas.items()}
    order = sorted(sizes, key=lambda k: (-(quotas[k] - alloc[k]), k))
    for k in order[: total - sum(alloc.values())]:
        alloc[k] += 1
    return alloc


def figure_key(record: dict[str, Any]) -> str:
    return f"{record.get('source', '')}#{record.get('figure', '')}"


def strata_of(record: dict[str, Any]) -> tuple[str, str]:
    sub = record["subfield"]
    return sub, tissue_system(record.get("caption", "")) if sub in TISSUE_STRATIFIED else ""


def allocate(candidates: list[dict[str, Any]], n: int) -> dict[tuple[str, str], int]:
    """Items per (subfield, tissue system) stratum: proportional over subfields, then within them."""
    by_sub = collections.Counter(r["subfield"] for r in candidates)
    per_sub = largest_remainder(n, dict(by_sub))
    out: dict[tuple[str, str], int] = {}
    for sub, k in per_sub.items():
        systems = collections.Counter(strata_of(r)[1] for r in candidates if r["subfield"] == sub)
        for system, m in largest_remainder(k, dict(systems)).items():
            out[(sub, system)] = m
    return out


def shuffle_options(mcq: dict[str, Any], target: str, rng: random.Random) -> dict[str, Any]:
    """The MCQ with its correct option moved to letter `target` and the others in random order."""
    letters = sorted(mcq["options"])
    correct = mcq["options"][mcq["answer"]]
    others = [mcq["options"][k] for k in letters if k != mcq["answer"]]
    rng.shuffle(others)
    t = letters.index(target)
    texts = others[:t] + [correct] + others[t:]
    return {"question": mcq["question"], "options": dict(zip(letters, texts, strict=True)), "answer": target}


def sample_rl(
    records: list[dict[str, Any]], n: int, seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[tuple[str, str], int]]:
    """(RL `mcq` records, SFT `chat` records disjoint from them, the allocation per stratum)."""
    candidates: dict[str, dict[str, Any]] = {}
    for r in sorted(records, key=lambda r: r["id"]):
        m = r.get("mcq")
        if r.get("task") != "mcq" or r.get("subfield") not in KEPT or not m:
            continue
        if not DIAGNOSIS.search(m["question"] + " " + str(m["options"].get(m["answer"], ""))):
            continue
        candidates.setdefault(figure_key(r), r)
    pool = list(candidates.values())
    alloc = allocate(pool, n)
    rng = random.Random(seed)
    chosen: list[dict[str, Any]] = []
    for stratum in sorted(alloc):
        members = [r for r in pool if strata_of(r) == stratum]
        chosen += rng.sample(members, alloc[stratum])
    rng.shuffle(chosen)
    rl = []
    for i, r in enumerate(chosen):
        letters = sorted(r["mcq"]["options"])
        mcq = shuffle_options(r["mcq"], letters[i % len(letters)], rng)
        rl.append(
            {
                "id": r["id"],
                "images": r["images"],
                **mcq,
                "subfield": r["subfield"],
                "tissue_system": strata_of(r)[1] or tissue_system(r.get("caption", "")),
                "difficulty": r.get("difficulty", ""),
                "source": r.get("source", ""),
                "figure": r.get("figure", ""),
                "image_sha256": r.get("image_sha256", ""),
            }
        )
    used_images = {r.get("image_sha256") for r in chosen if r.get("image_sha256")}
    used_figures = {figure_key(r) for r in chosen}
    sft = [
        r for r in records if r.get("image_sha256") not in used_images and figure_key(r) not in used_figures
    ]
    return rl, sft, alloc

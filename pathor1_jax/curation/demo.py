"""The curation demo: the generated book and its scanned twin through extract → filter → classify →
cluster (→ generate → qc → sample with an LLM), printing the pairs found against the generator's truth.

    pathor1 curate demo --out runs/demo/curation [--llm-url URL --llm-model NAME]
    pathor1 demo                                  # its first stage: `demo_stage` (no LLM)
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from pathor1_jax.train.result import StageResult

from .extract import _iou


def _cer(a: str, b: str) -> float:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1] / max(1, len(b))


def truth_units(truth: dict[str, Any]) -> list[dict[str, Any]]:
    """One expected pair per truth panel (or per figure without panels)."""
    out = []
    for source, pages in truth.items():
        for page in pages:
            for fig in page["figures"]:
                panels = fig["panels"] or [{"letter": None, "bbox": fig["bbox"], "text": ""}]
                for p in panels:
                    caption = " ".join(x for x in (fig["lead"], p["text"]) if x)
                    out.append(
                        {
                            "source": source,
                            "page": page["page"],
                            "figure": fig["figure"],
                            "panel": p["letter"],
                            "bbox": p["bbox"],
                            "caption": caption,
                            "inline_refs": fig["inline_refs"][p["letter"] or ""],
                        }
                    )
    return out


def score(records: list[dict[str, Any]], truth: dict[str, Any], min_iou: float = 0.8) -> dict[str, Any]:
    """Match found pairs to the truth (same source, page, figure, panel and IoU >= `min_iou`)."""
    expected = truth_units(truth)
    found = {(r["source"], r["page"], r["figure"], r["panel"]): r for r in records}
    rows = []
    for t in expected:
        r = found.get((t["source"], t["page"], t["figure"], t["panel"]))
        iou = _iou(r["bbox"], t["bbox"]) if r else 0.0
        norm = lambda s: re.sub(r"\s+", " ", s).strip()  # noqa: E731
        rows.append(
            {
                **t,
                "found": r is not None and iou >= min_iou,
                "iou": iou,
                "cer": _cer(norm(r["caption"]), norm(t["caption"])) if r else 1.0,
                "refs_ok": bool(r) and r["inline_refs"] == t["inline_refs"],
            }
        )
    hits = sum(r["found"] for r in rows)
    return {
        "rows": rows,
        "precision": hits / max(1, len(records)),
        "recall": hits / max(1, len(expected)),
        "expected": len(expected),
        "extracted": len(records),
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        f"{'source':<17} {'page':>4} {'fig':>5} {'panel':>5} {'found':>5} {'IoU':>5} {'CER':>6} {'refs':>5}"
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['source']:<17} {r['page']:>4} {r['figure']:>5} {r['panel'] or '-':>5} "
            f"{'yes' if r['found'] else 'NO':>5} {r['iou']:>5.2f} {r['cer']:>6.1%} "
            f"{'ok' if r['refs_ok'] else 'diff':>5}"
        )
    lines.append(
        f"pairs: {result['extracted']} extracted, {result['expected']} in the truth; "
        f"precision {result['precision']:.2f}, recall {result['recall']:.2f}"
    )
    return "\n".join(lines)


def run_demo(out: str, workers: int = 2, llm: Any = None) -> dict[str, Any]:
    from .demo_book import make_book
    from .io import read_jsonl
    from .steps import (
        Runner,
        run_classify,
        run_cluster,
        run_extract,
        run_filter,
        run_generate,
        run_qc,
        run_sample,
    )

    book = os.path.join(out, "book")
    truth = make_book(book)
    tables = {"extract": run_extract(book, os.path.join(out, "extract"), Runner("local", workers))}
    result = score(read_jsonl(os.path.join(out, "extract", "pairs.jsonl")), truth)
    tables["filter"] = run_filter(os.path.join(out, "extract"), os.path.join(out, "filter"))
    tables["classify"] = run_classify(os.path.join(out, "filter"), os.path.join(out, "classify"))
    tables["cluster"] = run_cluster(os.path.join(out, "classify"), os.path.join(out, "cluster"))
    if llm is not None:
        tables["generate"] = run_generate(os.path.join(out, "cluster"), os.path.join(out, "generate"), llm)
        tables["qc"] = run_qc(os.path.join(out, "generate"), os.path.join(out, "qc"))
        tables["sample"] = run_sample(os.path.join(out, "qc"), os.path.join(out, "rl"))
    for text in tables.values():
        print(f"\n{text}")
    print(
        "\npairs found vs the generator's truth (IoU >= 0.8 with its box; caption CER; in-line references):"
    )
    print(table(result))
    if llm is None:
        print("\ngenerate, qc, sample: skipped (they need an LLM: --llm-url URL --llm-model NAME)")
    return result


def demo_stage(out_dir: Path) -> StageResult:
    """`pathor1 demo`'s curation stage (`stages.STAGES["curation"]`): `run_demo` without an LLM; its
    row's metric is the recall of the pairs against the book's truth, its note the counts."""
    result = run_demo(str(out_dir))
    found = sum(row["found"] for row in result["rows"])
    note = (
        f"{found} of {result['expected']} true pairs found, {result['extracted']} extracted: "
        f"precision {result['precision']:.2f}"
    )
    return StageResult(
        "curation", Path(out_dir), None, 0, 0, "recall", None, result["recall"], False, note=note
    )

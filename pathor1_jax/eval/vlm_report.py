"""`pathor1 eval vlm`'s tables, in the paper's layout, from its predictions (pure functions + writers).

- **Multiple choice** (Tables 3 and 4): per benchmark and split, accuracy % per category (PathMMU's
  sources Atlas, EduContent, PathCLS, PubMed, SocialPath first) and overall, one row per prompt style,
  with the unparsable answers (wrong) and those an LLM judge resolved counted apart.
- **Yes/no** (Table 4, "YorN"): accuracy % per benchmark and split.
- **Open-ended** (Figure 5): per benchmark, the judge's final-answer accuracy %, the mean of each of
  the ten reasoning criteria (1–10) and "steps %" = mean overall score / 10 · 100 (LlamaV-o1's
  normalisation); CoT vs CoD is the prompt-style rows.
- **Responses**: mean generated tokens, `<think>…</think><answer>…</answer>` format rate, truncated %.

Written as `report.json`, `report.md`, `report.csv` (long format: one value per line) and
`report.png` (grouped bars, one colour per prompt style).
"""

from __future__ import annotations

import csv
import json
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from pathor1_jax.eval.judge import CRITERIA
from pathor1_jax.rl.rewards import format_reward

PATHMMU_SOURCES = ("Atlas", "EduContent", "PathCLS", "PubMed", "SocialPath")


def _pct(count: float, n: int) -> float | None:
    return None if n == 0 else round(100.0 * count / n, 2)


def _groups(predictions: Sequence[dict], kind: str) -> dict[tuple[str, str, str], list[dict]]:
    """(benchmark, split, prompt style) → predictions of that kind, in first-seen order."""
    out: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for p in predictions:
        if p["kind"] == kind:
            out[(p.get("benchmark") or "", p.get("split") or "", p["prompt_style"])].append(p)
    return out


def _closed(ps: Sequence[dict]) -> dict:
    n = len(ps)
    return {
        "n": n,
        "accuracy": _pct(sum(bool(p["correct"]) for p in ps), n),
        "accuracy_rules_only": _pct(sum(bool(p["correct"]) and p["resolved_by"] == "rules" for p in ps), n),
        "unparsed": sum(p["extracted"] is None for p in ps),
        "judge_resolved": sum(p["resolved_by"] == "judge" for p in ps),
    }


def category_order(categories: set[str]) -> list[str]:
    known = [c for c in PATHMMU_SOURCES if c in categories]
    return known + sorted(categories - set(known))


def build_report(predictions: Sequence[dict]) -> dict:
    """The tables (as JSON-ready dicts) of a set of predictions."""
    report: dict = {"mcq": [], "yes_no": [], "open": [], "responses": []}
    for (benchmark, split, style), ps in _groups(predictions, "mcq").items():
        by_category: dict[str, list[dict]] = defaultdict(list)
        for p in ps:
            if p.get("category"):
                by_category[p["category"]].append(p)
        categories = {c: _closed(by_category[c]) for c in category_order(set(by_category))}
        row = {"benchmark": benchmark, "split": split, "prompt_style": style, **_closed(ps)}
        report["mcq"].append({**row, "categories": categories})
    for (benchmark, split, style), ps in _groups(predictions, "yes_no").items():
        report["yes_no"].append(
            {"benchmark": benchmark, "split": split, "prompt_style": style, **_closed(ps)}
        )
    for (benchmark, split, style), ps in _groups(predictions, "open").items():
        judged = [p for p in ps if "judge" in p and "error" not in p["judge"]]
        criteria = {
            k: round(sum(p["judge"]["criteria"][k] for p in judged) / len(judged), 2) if judged else None
            for k in CRITERIA
        }
        mean_overall = sum(p["judge"]["overall"] for p in judged) / len(judged) if judged else None
        report["open"].append(
            {
                "benchmark": benchmark,
                "split": split,
                "prompt_style": style,
                "n": len(ps),
                "judged": len(judged),
                "judge_failed": sum("judge" in p and "error" in p["judge"] for p in ps),
                "accuracy": _pct(sum(bool(p["judge"]["correct"]) for p in judged), len(judged)),
                "criteria": criteria,
                "overall": None if mean_overall is None else round(mean_overall, 2),
                "steps_percent": None if mean_overall is None else round(mean_overall * 10, 2),
            }
        )
    by_style: dict[str, list[dict]] = defaultdict(list)
    for p in predictions:
        by_style[p["prompt_style"]].append(p)
    for style, ps in by_style.items():
        report["responses"].append(
            {
                "prompt_style": style,
                "n": len(ps),
                "mean_tokens": round(sum(p["num_tokens"] for p in ps) / len(ps), 1),
                "format_rate": _pct(sum(format_reward(p["response"]) == 1.0 for p in ps), len(ps)),
                "truncated": _pct(sum(p["finish_reason"] == "length" for p in ps), len(ps)),
            }
        )
    report["summary"] = {
        f"{kind}/{r['benchmark'] or '-'}/{r['split'] or '-'}/{r['prompt_style']}": r["accuracy"]
        for kind in ("mcq", "yes_no", "open")
        for r in report[kind]
    }
    return report


# ------------------------------------------------------------------------------------ writers


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)


def by_benchmark(rows: Sequence[dict]) -> dict[tuple[str, str], list[dict]]:
    """A table's rows by (benchmark, split), in first-seen order: one paper table each."""
    out: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        out[(r["benchmark"], r["split"])].append(r)
    return out


def _title(benchmark: str, split: str) -> str:
    return " · ".join(x for x in (benchmark or "(no benchmark)", split) if x)


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]


def markdown(report: dict) -> str:
    lines = ["# VLM evaluation", ""]
    if "settings" in report:
        lines += ["Settings: `" + json.dumps(report["settings"], ensure_ascii=False) + "`", ""]
    mcq_groups = by_benchmark(report["mcq"])
    if mcq_groups:
        lines += ["## Multiple choice (accuracy %)", ""]
        lines += ["Unparsable answers count as wrong; *judge-resolved* were read by the LLM judge.", ""]
    for (benchmark, split), rows in mcq_groups.items():
        categories = category_order({c for r in rows for c in r["categories"]})
        lines += [f"### {_title(benchmark, split)} ({rows[0]['n']} questions)", ""]
        header = ["prompt style", *categories, "Overall", "rules only", "unparsed", "judge-resolved"]
        body = [
            [
                r["prompt_style"],
                *[r["categories"].get(c, {}).get("accuracy") for c in categories],
                r["accuracy"],
                r["accuracy_rules_only"],
                r["unparsed"],
                r["judge_resolved"],
            ]
            for r in rows
        ]
        lines += [*_table(header, body), ""]
    if report["yes_no"]:
        columns = list(dict.fromkeys((r["benchmark"], r["split"]) for r in report["yes_no"]))
        styles = list(dict.fromkeys(r["prompt_style"] for r in report["yes_no"]))
        cell = {(r["benchmark"], r["split"], r["prompt_style"]): r for r in report["yes_no"]}
        lines += ["## Yes/no (accuracy %)", ""]
        header = ["prompt style", *[f"{_title(b, s)} (n={cell[(b, s, styles[0])]['n']})" for b, s in columns]]
        body = [
            [style, *[cell.get((b, s, style), {}).get("accuracy") for b, s in columns]] for style in styles
        ]
        lines += [*_table(header, body), ""]
    open_groups = by_benchmark(report["open"])
    if open_groups:
        lines += ["## Open-ended (LLM judge)", ""]
        lines += [
            "Final-answer accuracy %, reasoning steps % (mean criterion / 10 · 100), criteria 1–10.",
            "",
        ]
    for (benchmark, split), rows in open_groups.items():
        lines += [f"### {_title(benchmark, split)} ({rows[0]['n']} questions)", ""]
        header = ["prompt style", "judged", "final-answer acc", "steps %", *CRITERIA]
        body = [
            [
                r["prompt_style"],
                r["judged"],
                r["accuracy"],
                r["steps_percent"],
                *[r["criteria"][k] for k in CRITERIA],
            ]
            for r in rows
        ]
        lines += [*_table(header, body), ""]
        if any(r["judged"] == 0 for r in rows):
            lines += ["(No judge results: pass --judge-url and --judge-model.)", ""]
    lines += ["## Responses", ""]
    body = [
        [r["prompt_style"], r["n"], r["mean_tokens"], r["format_rate"], r["truncated"]]
        for r in report["responses"]
    ]
    lines += [*_table(["prompt style", "questions", "mean tokens", "format %", "truncated %"], body), ""]
    return "\n".join(lines)


def csv_rows(report: dict) -> list[dict]:
    """One line per value: table, benchmark, split, prompt_style, group, metric, value, n."""
    rows = []

    def add(table, r, group, metric, value, n):
        rows.append(
            {
                "table": table,
                "benchmark": r.get("benchmark", ""),
                "split": r.get("split", ""),
                "prompt_style": r["prompt_style"],
                "group": group,
                "metric": metric,
                "value": "" if value is None else value,
                "n": n,
            }
        )

    for r in report["mcq"]:
        for c, cell in r["categories"].items():
            add("mcq", r, c, "accuracy", cell["accuracy"], cell["n"])
        for metric in ("accuracy", "accuracy_rules_only", "unparsed", "judge_resolved"):
            add("mcq", r, "Overall", metric, r[metric], r["n"])
    for r in report["yes_no"]:
        for metric in ("accuracy", "accuracy_rules_only", "unparsed", "judge_resolved"):
            add("yes_no", r, "", metric, r[metric], r["n"])
    for r in report["open"]:
        for metric in ("accuracy", "steps_percent", "overall"):
            add("open", r, "", metric, r[metric], r["judged"])
        for k, v in r["criteria"].items():
            add("open", r, "criteria", k, v, r["judged"])
    for r in report["responses"]:
        for metric in ("mean_tokens", "format_rate", "truncated"):
            add("responses", r, "", metric, r[metric], r["n"])
    return rows


def plot(report: dict, path: Path) -> None:
    """Grouped bars: one panel per MCQ benchmark (categories + Overall), one for yes/no, one for
    open-ended final-answer accuracy and steps %; one bar colour per prompt style."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: list[tuple[str, list[str], dict[str, list[float | None]]]] = []
    for (benchmark, split), rows in by_benchmark(report["mcq"]).items():
        labels = [*category_order({c for r in rows for c in r["categories"]}), "Overall"]
        values = {
            r["prompt_style"]: [
                *[r["categories"].get(c, {}).get("accuracy") for c in labels[:-1]],
                r["accuracy"],
            ]
            for r in rows
        }
        panels.append((f"MCQ: {_title(benchmark, split)}", labels, values))
    if report["yes_no"]:
        labels = list(dict.fromkeys(_title(r["benchmark"], r["split"]) for r in report["yes_no"]))
        values: dict[str, list[float | None]] = defaultdict(lambda: [None] * len(labels))
        for r in report["yes_no"]:
            values[r["prompt_style"]][labels.index(_title(r["benchmark"], r["split"]))] = r["accuracy"]
        panels.append(("Yes/no", labels, dict(values)))
    if report["open"]:
        titles = list(dict.fromkeys(_title(r["benchmark"], r["split"]) for r in report["open"]))
        labels = [f"{t}\n{m}" for t in titles for m in ("final answer", "steps %")]
        values = defaultdict(lambda: [None] * len(labels))
        for r in report["open"]:
            i = 2 * titles.index(_title(r["benchmark"], r["split"]))
            values[r["prompt_style"]][i : i + 2] = [r["accuracy"], r["steps_percent"]]
        panels.append(("Open-ended (LLM judge)", labels, dict(values)))
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(max(6, 4.5 * len(panels)), 4), squeeze=False)
    for ax, (title, labels, values) in zip(axes[0], panels, strict=True):
        width = 0.8 / max(1, len(values))
        for k, (style, heights) in enumerate(values.items()):
            xs = [i + k * width for i in range(len(labels))]
            bars = ax.bar(xs, [0.0 if h is None else h for h in heights], width, label=style)
            ax.bar_label(bars, labels=["" if h is None else f"{h:.1f}" for h in heights], fontsize=6)
        ax.set_xticks(
            [i + 0.4 - width / 2 for i in range(len(labels))], labels, rotation=30, ha="right", fontsize=8
        )
        ax.set_ylim(0, 100)
        ax.set_ylabel("%")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def write_report(report: dict, out: Path) -> None:
    """report.json / .md / .csv / .png in `out`, each written to a temporary name and renamed."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    def atomic(name: str, write) -> None:
        tmp = out / f".{name}.tmp"
        write(tmp)
        if tmp.exists():  # (no plot without a table to plot)
            os.replace(tmp, out / name)

    atomic("report.json", lambda p: p.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n"))
    atomic("report.md", lambda p: p.write_text(markdown(report), encoding="utf-8"))

    def write_csv(p: Path) -> None:
        with open(p, "w", newline="", encoding="utf-8") as f:
            fields = ["table", "benchmark", "split", "prompt_style", "group", "metric", "value", "n"]
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(csv_rows(report))

    atomic("report.csv", write_csv)
    atomic("report.png", lambda p: plot(report, p))

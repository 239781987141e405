"""qc: rule-based quality control of generated chat records (paper §3.3), thresholds ours.

Rules (a record fails on any; each failure is counted per rule × subfield × level × task):
- `schema`: not a valid project `chat` record (`data.records.parse_record`);
- `mcq_options`: options not 2–6 contiguous letters from A (A–F), duplicate option texts, the answer
  not one of the letters, or an option's text (≥ 2 words) repeated verbatim in the stem;
- `format`: an assistant turn is not exactly `<think>…</think><answer>…</answer>` with each tag once
  (the RL format reward, `rl.rewards.format_reward`);
- `language_mixing`: CJK characters in a record whose caption has none (or Latin-script words making
  up most of a Chinese record);
- `repetition`: any word 8-gram repeated ≥ `max_ngram_repeats` times, or a zlib compression ratio
  below `min_compression` on texts of ≥ 400 characters (endless loops);
- `length`: an assistant turn's reasoning or answer outside the task's word bounds.
A stratified review sample (`review_per_stratum` per subfield × level × task, seeded) goes to a
person for the paper's "selective manual verification".
"""

from __future__ import annotations

import collections
import dataclasses
import random
import re
import zlib
from typing import Any

from pathor1_jax.data.records import OPTION_LETTERS, RecordError, parse_record
from pathor1_jax.rl.rewards import format_reward

RULES = ("schema", "mcq_options", "format", "language_mixing", "repetition", "length")
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")
_TAGGED = re.compile(r"<think>(.*?)</think>\s*<answer>(.*?)</answer>", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class QCConfig:
    max_ngram_repeats: int = 4
    ngram: int = 8
    min_compression: float = 0.3
    # task -> (reasoning words min, max, answer words min, max)
    bounds: tuple[tuple[str, tuple[int, int, int, int]], ...] = (
        ("mcq", (5, 600, 1, 40)),
        ("description", (10, 800, 5, 400)),
        ("reasoning", (10, 1000, 1, 300)),
        ("conversation", (3, 600, 1, 300)),
    )
    review_per_stratum: int = 2
    seed: int = 0


def repeated_ngrams(text: str, n: int) -> int:
    """The largest count of any word n-gram in `text`."""
    words = text.split()
    counts = collections.Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    return max(counts.values(), default=0)


def compression_ratio(text: str) -> float:
    data = text.encode("utf-8")
    return len(zlib.compress(data, 9)) / max(1, len(data))


def language_mixed(text: str, caption: str) -> bool:
    if not _CJK.search(caption):
        return bool(_CJK.search(text))
    latin_words = len(re.findall(r"[A-Za-z]{3,}", text))
    return latin_words > len(_CJK.findall(text))


def mcq_problems(mcq: dict[str, Any]) -> list[str]:
    options, answer, stem = mcq.get("options"), mcq.get("answer"), mcq.get("question", "")
    if not isinstance(options, dict):
        return ["options missing"]
    letters = "".join(sorted(options))
    out = []
    if not (2 <= len(letters) <= 6) or letters != OPTION_LETTERS[: len(letters)]:
        out.append(f"letters {letters!r} are not 2-6 contiguous from A")
    texts = [str(v).strip().lower() for v in options.values()]
    if len(set(texts)) != len(texts):
        out.append("duplicate option texts")
    if answer not in options:
        out.append(f"answer {answer!r} is not an option")
    for k, v in options.items():
        if len(str(v).split()) >= 2 and str(v).strip().lower() in stem.lower():
            out.append(f"option {k} is repeated in the stem")
    return out


def check(record: dict[str, Any], cfg: QCConfig) -> dict[str, str]:
    """rule -> why, for each rule the record breaks (empty: it passes)."""
    failed: dict[str, str] = {}
    try:
        parse_record("chat", record, f"record {record.get('id')!r}")
    except RecordError as e:
        return {"schema": str(e)}
    if record.get("task") == "mcq":
        problems = mcq_problems(record.get("mcq") or {})
        if problems:
            failed["mcq_options"] = "; ".join(problems)
    turns = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
    bad_format = [i for i, t in enumerate(turns) if not isinstance(t, str) or format_reward(t) != 1.0]
    if bad_format:
        failed["format"] = f"assistant turn(s) {bad_format} not <think>…</think><answer>…</answer>"
    text = "\n".join(t for t in turns if isinstance(t, str))
    if language_mixed(text, record.get("caption", "")):
        failed["language_mixing"] = "CJK / Latin script mixed against the caption's language"
    top = repeated_ngrams(text, cfg.ngram)
    ratio = compression_ratio(text)
    if top >= cfg.max_ngram_repeats or (len(text) >= 400 and ratio < cfg.min_compression):
        failed["repetition"] = f"an {cfg.ngram}-gram repeated {top}x, compression ratio {ratio:.2f}"
    bounds = dict(cfg.bounds).get(record.get("task", ""))
    if bounds and "format" not in failed:
        rmin, rmax, amin, amax = bounds
        for t in turns:
            m = _TAGGED.fullmatch(t.strip())
            r_words, a_words = len(m.group(1).split()), len(m.group(2).split())
            if not (rmin <= r_words <= rmax and amin <= a_words <= amax):
                failed["length"] = f"reasoning {r_words} words, answer {a_words} words (bounds {bounds})"
                break
    return failed


def qc_records(records: list[dict[str, Any]], cfg: QCConfig) -> list[dict[str, Any]]:
    """Each record with its `qc` failures (rule -> why)."""
    return [{**r, "qc": check(r, cfg)} for r in records]


def report_rows(checked: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Counts per (subfield, difficulty, task): total, passed, and failures per rule."""
    table: dict[tuple[str, str, str], collections.Counter] = collections.defaultdict(collections.Counter)
    for r in checked:
        key = (r.get("subfield", ""), r.get("difficulty", ""), r.get("task", ""))
        table[key]["total"] += 1
        table[key]["passed"] += not r["qc"]
        for rule in r["qc"]:
            table[key][rule] += 1
    return [
        {
            "subfield": k[0],
            "difficulty": k[1],
            "task": k[2],
            "total": c["total"],
            "passed": c["passed"],
            **{rule: c[rule] for rule in RULES},
        }
        for k, c in sorted(table.items())
    ]


def review_sample(checked: list[dict[str, Any]], cfg: QCConfig) -> list[dict[str, Any]]:
    """Up to `review_per_stratum` passed records per (subfield, difficulty, task), seeded."""
    strata: dict[tuple[str, str, str], list[dict[str, Any]]] = collections.defaultdict(list)
    for r in checked:
        if not r["qc"]:
            strata[(r.get("subfield", ""), r.get("difficulty", ""), r.get("task", ""))].append(r)
    rng = random.Random(cfg.seed)
    out = []
    for key in sorted(strata):
        items = sorted(strata[key], key=lambda r: r["id"])
        out += rng.sample(items, min(cfg.review_per_stratum, len(items)))
    return out

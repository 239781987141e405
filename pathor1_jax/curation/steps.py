"""The curation steps as functions of their options: what `pathor1 curate <step>` runs.

Each `run_<step>(...)` reads its input (a file, or the previous step's output directory), writes its
outputs into `out` (atomically), and returns the summary table it printed. Outputs per step:

| step | main output | side outputs |
|---|---|---|
| extract | `pairs.jsonl` (+ `images/`) | `extract_report.json` |
| filter | `pairs.jsonl` | `rejected.jsonl` (with `reasons`), `filter_report.json` |
| classify | `pairs.jsonl` (+ `subfield`) | `review.csv`, `embeddings.npz`, `head.npz` |
| cluster | `pairs.jsonl` (+ `difficulty`, `cluster`) | `cluster_samples.csv` |
| generate | `chat.jsonl` | `llm_cache.jsonl`, `generate_report.json` |
| qc | `chat.jsonl` (passed) | `rejected.jsonl`, `qc_report.csv`, `review_sample.jsonl` |
| sample | `rl_mcq.jsonl`, `sft_chat.jsonl` | `strata.csv` |

Image paths in every output are relative to that output's directory.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import os
from functools import partial
from typing import Any

import numpy as np

from .io import (
    Report,
    Unit,
    collect,
    content_id,
    finish,
    read_jsonl,
    record_units,
    run_local,
    step_input,
    write_csv,
)

RUNNERS = ("local", "beam")


@dataclasses.dataclass(frozen=True)
class Runner:
    """How units run: `local` (a process pool of `workers`) or `beam` (with `beam_args`)."""

    kind: str = "local"
    workers: int = 1
    beam_args: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class LLMSpec:
    """Where the LLM is; the key is read from the environment variable `key_env`."""

    url: str
    model: str
    key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8

    def client(self, cache: str) -> Any:
        from pathor1_jax.data.llm import LLMClient

        return LLMClient(
            self.url, self.model, api_key_env=self.key_env, cache=cache, max_concurrency=self.concurrency
        )


def _run(fn: Any, units: list[Unit], out: str, step: str, runner: Runner) -> None:
    if runner.kind == "beam":
        from .beam import run_beam

        run_beam(fn, units, out, step, list(runner.beam_args))
    elif runner.kind == "local":
        run_local(fn, units, out, step, runner.workers, desc=step)
    else:
        raise ValueError(f"unknown runner {runner.kind!r}; runners are {RUNNERS}")


def rebase_images(rows: list[dict[str, Any]], src_dir: str, out_dir: str) -> list[dict[str, Any]]:
    """Rows whose `image` / `images` paths (relative to `src_dir`) are made relative to `out_dir`."""

    def move(p: Any) -> Any:
        if not isinstance(p, str):
            return p
        return os.path.relpath(p if os.path.isabs(p) else os.path.join(src_dir, p), out_dir)

    out = []
    for r in rows:
        r = dict(r)
        if "image" in r:
            r["image"] = move(r["image"])
        if "images" in r:
            r["images"] = [move(p) for p in r["images"]]
        out.append(r)
    return out


def _load(path: str, name: str) -> tuple[list[dict[str, Any]], str]:
    src = step_input(path, name)
    return read_jsonl(src), os.path.dirname(os.path.abspath(src))


# ---------------------------------------------------------------------------------------------------
# extract


def _extract_unit(unit: Unit, out: str, cfg: Any, llm: LLMSpec | None) -> tuple[list[dict[str, Any]], Report]:
    from .extract import extract_pdf

    client = llm.client(os.path.join(out, "llm_cache", f"{unit.digest}.jsonl")) if llm else None
    return extract_pdf(unit.payload, out, cfg, llm=client, name=unit.name)


def pdf_paths(path: str) -> list[str]:
    if os.path.isdir(path):
        found = sorted(glob.glob(os.path.join(path, "**", "*.pdf"), recursive=True))
        if not found:
            raise FileNotFoundError(f"{path}: no *.pdf files")
        return found
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file or directory")
    return [path]


def run_extract(inp: str, out: str, runner: Runner = Runner(), llm: LLMSpec | None = None, **cfg: Any) -> str:
    from .extract import ExtractConfig, pdf_units

    config = ExtractConfig(**cfg)
    os.makedirs(out, exist_ok=True)
    units = pdf_units(pdf_paths(inp), config)
    _run(partial(_extract_unit, out=os.path.abspath(out), cfg=config, llm=llm), units, out, "extract", runner)
    rows, report = collect(out, "extract", units)
    return finish(out, "extract", report, {"pairs.jsonl": rows})


# ---------------------------------------------------------------------------------------------------
# filter


def _filter_unit(unit: Unit, cfg: Any, base_dir: str) -> tuple[list[dict[str, Any]], Report]:
    from .filter import check_records

    return check_records(unit, cfg, base_dir)


def run_filter(inp: str, out: str, runner: Runner = Runner(), per_shard: int = 500, **cfg: Any) -> str:
    from .filter import FilterConfig, dedup

    config = FilterConfig(**cfg)
    rows, src = _load(inp, "pairs.jsonl")
    os.makedirs(out, exist_ok=True)
    units = record_units(rows, "filter", {**dataclasses.asdict(config), "src": src}, per_shard)
    _run(partial(_filter_unit, cfg=config, base_dir=src), units, out, "filter", runner)
    checked, report = collect(out, "filter", units)
    dedup(checked, config.near_bits)
    for r in checked:
        for reason in r["reasons"]:
            report.count(f"rule:{reason}")
    kept = [{k: v for k, v in r.items() if k != "reasons"} for r in checked if not r["reasons"]]
    rejected = [r for r in checked if r["reasons"]]
    report.count("in", len(checked))
    report.count("kept", len(kept))
    report.count("rejected", len(rejected))
    return finish(
        out,
        "filter",
        report,
        {
            "pairs.jsonl": rebase_images(kept, src, out),
            "rejected.jsonl": rebase_images(rejected, src, out),
        },
    )


# ---------------------------------------------------------------------------------------------------
# classify


def _abs_images(rows: list[dict[str, Any]], src: str) -> list[dict[str, Any]]:
    return [
        {**r, "image": r["image"] if os.path.isabs(r["image"]) else os.path.join(src, r["image"])}
        for r in rows
    ]


def embeddings_for(rows: list[dict[str, Any]], src: str, out: str, clip: str | None) -> np.ndarray:
    """Joint [image | caption] CLIP embeddings of `rows`, cached in `out/embeddings.npz` by content."""
    from .classify import embed, load_clip

    key = content_id([r["id"] for r in rows], [r["caption"] for r in rows], clip or "tiny-random")
    path = os.path.join(out, "embeddings.npz")
    if os.path.exists(path):
        cached = np.load(path)
        if str(cached["key"]) == key:
            return cached["joint"]
    if clip is None:
        print("classify: no --clip checkpoint: using a tiny random-init CLIP (plumbing only, see README)")
    img, txt = embed(_abs_images(rows, src), load_clip(clip))
    joint = np.concatenate([img, txt], axis=1)
    tmp = path + ".tmp.npz"
    np.savez(tmp, key=key, ids=np.array([r["id"] for r in rows]), joint=joint)
    os.replace(tmp, path)
    return joint


def run_classify(
    inp: str, out: str, clip: str | None = None, labels: str | None = None, steps: int = 300, seed: int = 0
) -> str:
    from .classify import keyword_label, read_corrections, subfield_table, write_review
    from .jax_ops import HeadConfig, default_mesh, predict_head, train_head

    rows, src = _load(inp, "pairs.jsonl")
    if not rows:
        raise ValueError(f"{inp}: no pairs to classify")
    os.makedirs(out, exist_ok=True)
    names = subfield_table()["subfields"]
    manual = read_corrections(labels, {r["id"] for r in rows}) if labels else {}
    weak = [keyword_label(r["caption"]) for r in rows]
    y = np.array(
        [
            names.index(manual.get(r["id"]) or w) if (manual.get(r["id"]) or w) else -1
            for r, w in zip(rows, weak, strict=True)
        ]
    )
    report = Report()
    report.count("pairs", len(rows))
    report.count("weak_labels", sum(w is not None for w in weak))
    report.count("manual_labels", len(manual))
    if (y >= 0).sum() == 0:
        raise ValueError(
            f"{inp}: no caption matched a subfield keyword and no --labels were given: nothing to train on"
        )
    x = embeddings_for(rows, src, out, clip)
    W, b, losses = train_head(x, y, len(names), default_mesh(), HeadConfig(steps=steps, seed=seed))
    probs = predict_head(x, W, b)
    np.savez(os.path.join(out, "head.npz"), W=W, b=b, classes=np.array(names), losses=np.array(losses))
    labelled = y >= 0
    agree = float((probs.argmax(1)[labelled] == y[labelled]).mean())
    print(f"classify: head loss {losses[0]:.3f} -> {losses[-1]:.3f}, agreement with its labels {agree:.1%}")
    result = []
    for r, w, p in zip(rows, weak, probs, strict=True):
        k = int(p.argmax())
        sub, source = (manual[r["id"]], "manual") if r["id"] in manual else (names[k], "model")
        result.append(
            {
                **r,
                "subfield": sub,
                "subfield_source": source,
                "subfield_confidence": round(float(p[k]), 4),
                "weak_label": w,
            }
        )
        report.count(f"subfield:{sub}")
    result = rebase_images(result, src, out)
    write_review(os.path.join(out, "review.csv"), result)
    return finish(out, "classify", report, {"pairs.jsonl": result})


# ---------------------------------------------------------------------------------------------------
# cluster


LEVELS = ("easy", "medium", "hard")


def information(r: dict[str, Any]) -> int:
    """Our difficulty proxy: words of caption and in-line references (more to reason over = harder)."""
    return len(r["caption"].split()) + sum(len(s.split()) for s in r.get("inline_refs") or [])


def run_cluster(
    inp: str,
    out: str,
    clip: str | None = None,
    k: int = 3,
    n_init: int = 10,
    seed: int = 0,
    samples_per_cluster: int = 20,
) -> str:
    """K-means (k=3) per kept subfield on the joint embeddings; clusters ordered by mean `information`
    become easy / medium / hard (our rule; the paper observed the levels but does not state a rule)."""
    from .classify import KEPT
    from .jax_ops import default_mesh, kmeans

    rows, src = _load(inp, "pairs.jsonl")
    os.makedirs(out, exist_ok=True)
    embed_dir = os.path.dirname(step_input(inp, "pairs.jsonl"))
    x = embeddings_for(rows, src, embed_dir, clip)
    mesh = default_mesh()
    report = Report()
    result: list[dict[str, Any] | None] = [None] * len(rows)
    samples = []
    by_sub: dict[str, list[int]] = collections.defaultdict(list)
    for i, r in enumerate(rows):
        by_sub[r.get("subfield", "")].append(i)
    for sub, idx in sorted(by_sub.items()):
        if sub not in KEPT:
            report.count(f"skipped_subfield:{sub or '-'}", len(idx))
            continue
        if len(idx) >= k:
            _, labels, _ = kmeans(x[idx], k, mesh, n_init=n_init, seed=seed)
        else:  # too few to cluster: each pair is its own cluster
            labels = np.arange(len(idx))
            report.count("subfields_too_small_to_cluster")
        means = {
            c: np.mean([information(rows[idx[j]]) for j in np.flatnonzero(labels == c)])
            for c in set(labels.tolist())
        }
        order = sorted(means, key=lambda c: (means[c], c))
        level_of = {
            c: LEVELS[min(len(LEVELS) - 1, rank * len(LEVELS) // max(len(order), 1))]
            for rank, c in enumerate(order)
        }
        for j, i in enumerate(idx):
            c = int(labels[j])
            result[i] = {**rows[i], "cluster": f"{sub}/{c}", "difficulty": level_of[c]}
            report.count(f"{sub}:{level_of[c]}")
        for c in order:
            members = [rows[idx[j]] for j in np.flatnonzero(labels == c)][:samples_per_cluster]
            samples += [(sub, c, level_of[c], m) for m in members]
    kept = rebase_images([r for r in result if r is not None], src, out)
    write_csv(
        os.path.join(out, "cluster_samples.csv"),
        ["subfield", "cluster", "difficulty", "id", "image", "caption", "confirmed"],
        [
            [sub, c, level, m["id"], os.path.relpath(os.path.join(src, m["image"]), out), m["caption"], ""]
            for sub, c, level, m in samples
        ],
    )
    return finish(out, "cluster", report, {"pairs.jsonl": kept})


# ---------------------------------------------------------------------------------------------------
# generate


def run_generate(
    inp: str,
    out: str,
    llm: LLMSpec,
    tasks: tuple[str, ...] = ("mcq", "description", "reasoning", "conversation"),
    temperature: float = 0.6,
    max_tokens: int = 4096,
    per_shard: int = 200,
) -> str:
    from .classify import KEPT
    from .generate import TASKS, generate_records

    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; tasks are {list(TASKS)}")
    rows, src = _load(inp, "pairs.jsonl")
    rows = [r for r in rows if r.get("subfield") in KEPT and r.get("difficulty")]
    os.makedirs(out, exist_ok=True)
    params = {"temperature": temperature, "max_tokens": max_tokens}
    units = record_units(
        rebase_images(rows, src, out), "generate", {"tasks": tasks, **params, "model": llm.model}, per_shard
    )
    with llm.client(os.path.join(out, "llm_cache.jsonl")) as client:

        def fn(unit: Unit) -> tuple[list[dict[str, Any]], Report]:
            return generate_records(unit.payload, client, tasks, params)

        run_local(fn, units, out, "generate", workers=1, desc="generate")
        stats = dict(client.stats)
    records, report = collect(out, "generate", units)
    for k, v in stats.items():
        report.count(f"llm_{k}_this_run", v)
    return finish(out, "generate", report, {"chat.jsonl": records})


# ---------------------------------------------------------------------------------------------------
# qc


def _qc_unit(unit: Unit, cfg: Any) -> tuple[list[dict[str, Any]], Report]:
    from .qc import qc_records

    return qc_records(unit.payload, cfg), Report()


def run_qc(inp: str, out: str, runner: Runner = Runner(), per_shard: int = 1000, **cfg: Any) -> str:
    from .qc import RULES, QCConfig, report_rows, review_sample

    config = QCConfig(**cfg)
    rows, src = _load(inp, "chat.jsonl")
    os.makedirs(out, exist_ok=True)
    units = record_units(rows, "qc", dataclasses.asdict(config), per_shard)
    _run(partial(_qc_unit, cfg=config), units, out, "qc", runner)
    checked, report = collect(out, "qc", units)
    for r in checked:
        for rule, why in r["qc"].items():
            report.count(f"rule:{rule}")
            if rule == "schema":
                report.bad("schema", str(r.get("id")), why)
    table = report_rows(checked)
    columns = ["subfield", "difficulty", "task", "total", "passed", *RULES]
    write_csv(os.path.join(out, "qc_report.csv"), columns, [[row[c] for c in columns] for row in table])
    passed = [{k: v for k, v in r.items() if k != "qc"} for r in checked if not r["qc"]]
    report.count("in", len(checked))
    report.count("passed", len(passed))
    return finish(
        out,
        "qc",
        report,
        {
            "chat.jsonl": rebase_images(passed, src, out),
            "rejected.jsonl": rebase_images([r for r in checked if r["qc"]], src, out),
            "review_sample.jsonl": rebase_images(review_sample(checked, config), src, out),
        },
    )


# ---------------------------------------------------------------------------------------------------
# sample


def run_sample(inp: str, out: str, n: int = 10000, seed: int = 0) -> str:
    from .sample import sample_rl

    rows, src = _load(inp, "chat.jsonl")
    os.makedirs(out, exist_ok=True)
    rl, sft, alloc = sample_rl(rows, n, seed)
    report = Report()
    report.count("in", len(rows))
    report.count("rl_mcq", len(rl))
    report.count("sft_chat", len(sft))
    report.count("excluded_from_sft", len(rows) - len(sft))
    letters = collections.Counter(r["answer"] for r in rl)
    for k, v in sorted(letters.items()):
        report.count(f"answer:{k}", v)
    write_csv(
        os.path.join(out, "strata.csv"),
        ["subfield", "tissue_system", "allocated"],
        [[sub, system, m] for (sub, system), m in sorted(alloc.items())],
    )
    return finish(
        out,
        "sample",
        report,
        {
            "rl_mcq.jsonl": rebase_images(rl, src, out),
            "sft_chat.jsonl": rebase_images(sft, src, out),
        },
    )

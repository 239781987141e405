"""What every curation step shares: content-hash ids and shards, atomic writes, the bad-input log,
the local process-pool runner and the closing summary table.

A step turns *units* of work (a PDF, or a shard of input records) into output shards. A unit's shard
is named by the sha256 of (step, its parameters, its input content): a rerun finds the shard already
there and skips the unit; changed input or parameters give a new name. Shards are written to a
temporary file and renamed, so a killed run leaves only complete shards. The step's merged output is
the concatenation of its shards in unit order, rewritten atomically at the end of each run.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

SHARD_DIR = "shards"


def content_id(*parts: Any, n: int = 16) -> str:
    """A short stable id: sha256 of the canonical JSON of `parts`, first `n` hex digits."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:n]


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def dumps_jsonl(rows: Iterable[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode("utf-8")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> None:
    """Rows as JSONL, written to a temporary file and renamed (never half-written)."""
    atomic_write_bytes(path, dumps_jsonl(rows))


def write_csv(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A CSV with a header row, written to a temporary file and renamed."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode("utf-8"))


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file; a bad line raises ValueError naming file and line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{os.fspath(path)}:{lineno}: malformed JSON: {e.msg}") from None
    return rows


def step_input(path: str | os.PathLike, name: str) -> str:
    """The JSONL a step reads: `path` itself, or `path/<name>` when `path` is a previous step's dir."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input {path} does not exist (expected a JSONL file or a step's output dir)")
    return path


# ---------------------------------------------------------------------------------------------------
# Bad input and summaries


@dataclasses.dataclass
class Report:
    """Counters and the bad-input log of one step; merged across units, printed as the summary."""

    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    problems: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def count(self, name: str, n: int = 1) -> None:
        self.counts[name] += n

    def bad(self, kind: str, where: str, detail: str) -> None:
        """Log one piece of bad input (`where`: file, file:page or record id) and count it."""
        self.counts[f"bad:{kind}"] += 1
        self.problems.append({"kind": kind, "where": where, "detail": detail[:300]})

    def merge(self, other: Report) -> None:
        self.counts.update(other.counts)
        self.problems.extend(other.problems)

    def to_json(self) -> dict[str, Any]:
        return {"counts": dict(sorted(self.counts.items())), "problems": self.problems}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Report:
        return cls(collections.Counter(obj.get("counts", {})), list(obj.get("problems", [])))

    def table(self, title: str) -> str:
        width = max([len(k) for k in self.counts] + [10])
        lines = [title, f"  {'count':<{width}} {'n':>8}"]
        lines += [f"  {k:<{width}} {v:>8}" for k, v in sorted(self.counts.items())]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Units, shards and the runners


@dataclasses.dataclass(frozen=True)
class Unit:
    """One piece of work: a name for logs, its content hash (shard name) and its payload."""

    name: str
    digest: str
    payload: Any


def shard_path(out_dir: str, step: str, unit: Unit) -> str:
    return os.path.join(out_dir, SHARD_DIR, f"{step}-{unit.digest}.jsonl")


def report_path(out_dir: str, step: str, unit: Unit) -> str:
    return os.path.join(out_dir, SHARD_DIR, f"{step}-{unit.digest}.report.json")


def save_unit(out_dir: str, step: str, unit: Unit, rows: list[dict[str, Any]], report: Report) -> None:
    """A finished unit: its report first, then its shard (whose presence marks the unit done)."""
    atomic_write_bytes(report_path(out_dir, step, unit), json.dumps(report.to_json()).encode())
    write_jsonl(shard_path(out_dir, step, unit), rows)


def record_units(
    rows: Sequence[dict[str, Any]], step: str, params: dict[str, Any], per_shard: int
) -> list[Unit]:
    """Input records cut into units of `per_shard` in input order, each named by its content."""
    units = []
    for start in range(0, len(rows), per_shard):
        chunk = list(rows[start : start + per_shard])
        units.append(Unit(f"records[{start}:{start + len(chunk)}]", content_id(step, params, chunk), chunk))
    return units


UnitFn = Callable[[Unit], tuple[list[dict[str, Any]], Report]]


def _run_and_save(args: tuple[UnitFn, str, str, Unit]) -> str:
    fn, out_dir, step, unit = args
    rows, report = fn(unit)
    save_unit(out_dir, step, unit, rows, report)
    return unit.name


def run_local(fn: UnitFn, units: Sequence[Unit], out_dir: str, step: str, workers: int, desc: str) -> None:
    """Run `fn` on each unfinished unit: in this process (`workers` <= 1) or a spawn process pool."""
    from tqdm import tqdm

    todo = [u for u in units if not os.path.exists(shard_path(out_dir, step, u))]
    jobs = [(fn, out_dir, step, u) for u in todo]
    bar = tqdm(total=len(units), initial=len(units) - len(todo), desc=desc, unit="unit")
    if workers <= 1 or len(todo) <= 1:
        for job in jobs:
            _run_and_save(job)
            bar.update()
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("spawn")  # no inherited threads (onnxruntime, JAX)
        with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx) as pool:
            for _ in pool.map(_run_and_save, jobs):
                bar.update()
    bar.close()


def collect(out_dir: str, step: str, units: Sequence[Unit]) -> tuple[list[dict[str, Any]], Report]:
    """The rows of all units in unit order and their merged report."""
    rows: list[dict[str, Any]] = []
    report = Report()
    for unit in units:
        rows.extend(read_jsonl(shard_path(out_dir, step, unit)))
        with open(report_path(out_dir, step, unit)) as f:
            report.merge(Report.from_json(json.load(f)))
    return rows, report


def finish(out_dir: str, step: str, report: Report, outputs: dict[str, Iterable[dict[str, Any]]]) -> str:
    """Write the step's merged outputs, its report (`<step>_report.json`) and bad-input log; the table."""
    for name, rows in outputs.items():
        write_jsonl(os.path.join(out_dir, name), rows)
    atomic_write_bytes(
        os.path.join(out_dir, f"{step}_report.json"),
        json.dumps(report.to_json(), indent=1, ensure_ascii=False).encode("utf-8"),
    )
    for p in report.problems[:20]:
        print(f"  bad input [{p['kind']}] {p['where']}: {p['detail']}")
    if len(report.problems) > 20:
        print(f"  ... {len(report.problems) - 20} more in {out_dir}/{step}_report.json")
    return report.table(f"curate {step}: {out_dir}")


def iter_rows(paths: Iterable[str]) -> Iterator[dict[str, Any]]:
    for p in paths:
        yield from read_jsonl(p)

"""JSONL files of records: reading (errors name file and line) and writing."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence

from .records import ImageRef, Record, RecordError, map_images, parse_record, record_to_json


def read_jsonl(path: str | os.PathLike, kind: str) -> list[Record]:
    """All records of a JSONL file, relative image paths resolved against the file's directory.

    Blank lines are skipped. Text that is not UTF-8, malformed JSON, a record that breaks the schema,
    or a duplicate id raises `RecordError` whose message starts with `"{path}:{line}: "`.
    """
    path = os.fspath(path)
    base_dir = os.path.dirname(os.path.abspath(path))

    def resolve(ref: ImageRef) -> ImageRef:
        if ref.path is None or os.path.isabs(ref.path):
            return ref
        return ImageRef(path=os.path.join(base_dir, ref.path))

    records: list[Record] = []
    seen: dict[str, int] = {}
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise RecordError(f"{where}: not UTF-8 text (byte {e.start}: {e.reason})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecordError(f"{where}: malformed JSON: {e.msg} (column {e.colno})") from None
            record = parse_record(kind, obj, where)
            if record.id in seen:
                raise RecordError(f"{where}: duplicate id {record.id!r} (first on line {seen[record.id]})")
            seen[record.id] = lineno
            records.append(map_images(record, resolve))
    return records


def read_jsonl_files(paths: str | os.PathLike | Sequence[str | os.PathLike], kind: str) -> list[Record]:
    """The records of several JSONL files in order; ids must be unique across them."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    records: list[Record] = []
    first: dict[str, str] = {}
    for p in paths:
        for record in read_jsonl(p, kind):
            if record.id in first:
                raise RecordError(f"{os.fspath(p)}: duplicate id {record.id!r} (also in {first[record.id]})")
            first[record.id] = os.fspath(p)
            records.append(record)
    return records


def write_jsonl(path: str | os.PathLike, records: Iterable[Record]) -> None:
    """Write records as JSONL (to a temporary file, renamed at the end)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record_to_json(record), ensure_ascii=False) + "\n")
    os.replace(tmp, path)

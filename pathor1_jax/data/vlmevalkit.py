"""VLMEvalKit's benchmark TSV files → our `mcq` / `vqa` records (local files only; nothing is downloaded).

The layout (VLMEvalKit's image datasets, e.g. `PathMMU_VAL.tsv`, `PathVQA_TEST.tsv`): a header line,
then one tab-separated row per question (pandas quoting: a cell may be `"…"` with `""` escapes;
an empty cell is a missing value). Columns:

- `index`: the question's id (our `id`, as a string);
- `image`: base64 of an encoded image; or a Python list literal of several (`['…', '…']`); or, to
  save space, the `index` of another row whose image it shares (a value of at most 64 characters,
  as VLMEvalKit reads it). A row whose `image` cell is empty is dropped (VLMEvalKit skips
  image-less rows of image benchmarks); a file without an `image` column gives text-only records;
- `question`; `hint` (optional: put before the question as `Hint: …` on its own line, as
  VLMEvalKit's MCQ prompt does);
- `A` … `F`: the options (empty cells: no such option). A row with options becomes an `mcq`
  record, a row without a `vqa` record: `yes_no` when its answer is yes or no (any case), `open`
  otherwise;
- `answer`: the option letter (MCQ) or the reference answer (VQA); required (we only score);
- `category`, `l2-category`, `split` (optional) → the record's `category`, `l2_category`, `split`.

`benchmark` (default: the file name without `.tsv`) is set on every record.
"""

from __future__ import annotations

import ast
import csv
import os
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .records import OPTION_LETTERS, MCQRecord, RecordError, VQARecord, parse_record

REFERENCE_MAX_CHARS = 64  # VLMEvalKit: an `image` of at most this many characters names another row
_LETTERS_BEYOND = [c for c in string.ascii_uppercase if c not in OPTION_LETTERS]


@dataclass
class TSVImport:
    """What an import produced: the records, and the rows skipped for having no image."""

    records: list[MCQRecord | VQARecord]
    skipped_no_image: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        kinds = {"mcq": 0, "yes_no": 0, "open": 0}
        for r in self.records:
            kinds["mcq" if isinstance(r, MCQRecord) else r.answer_type] += 1
        return {**kinds, "skipped_no_image": len(self.skipped_no_image)}


def _cell(row: dict, key: str) -> str:
    value = row.get(key)
    return "" if value is None else value.strip()


def _image_list(value: str) -> list[str]:
    """One cell's base64 strings (a list literal holds several)."""
    if value.startswith("[") and value.endswith("]"):
        items = ast.literal_eval(value)
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            raise ValueError("a list-valued image cell must hold strings")
        return [x.strip() for x in items]
    return [value]


def read_vlmevalkit_tsv(path: str | os.PathLike, benchmark: str | None = None) -> TSVImport:
    """The records of one VLMEvalKit TSV file (see the module docstring); errors name file:line."""
    path = Path(path)
    benchmark = path.name.removesuffix(".tsv") if benchmark is None else benchmark
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # base64 images are far above csv's default
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        columns = reader.fieldnames or []
        missing = [c for c in ("index", "question", "answer") if c not in columns]
        if missing:
            raise RecordError(f"{path}: not a VLMEvalKit TSV: no column(s) {missing} (header: {columns})")
        extra_letters = [c for c in _LETTERS_BEYOND if c in columns]
        rows = [(reader.line_num, row) for row in reader]
    # `image` cells naming another row resolve against the whole file (VLMEvalKit's image_map)
    images_by_index = {_cell(row, "index"): _cell(row, "image") for _, row in rows}
    out = TSVImport(records=[])
    for line, row in rows:
        where, rid = f"{path}:{line}", _cell(row, "index")
        for letter in extra_letters:
            if _cell(row, letter):
                raise RecordError(f"{where} (record {rid!r}): option {letter}: at most 6 options (A-F)")
        obj: dict = {"id": rid, "benchmark": benchmark}
        if "image" in columns:
            value = _cell(row, "image")
            if not value:
                out.skipped_no_image.append(rid)
                continue
            if len(value) <= REFERENCE_MAX_CHARS:
                target = images_by_index.get(value, "")
                if len(target) <= REFERENCE_MAX_CHARS:
                    raise RecordError(
                        f"{where} (record {rid!r}): column 'image' is {value!r}, which is neither base64 "
                        "nor the index of a row holding an image"
                    )
                value = target
            try:
                encoded = _image_list(value)
            except (ValueError, SyntaxError) as e:
                raise RecordError(f"{where} (record {rid!r}): column 'image': {e}") from None
            obj["images"] = [{"bytes_b64": b64} for b64 in encoded]
        question, hint = _cell(row, "question"), _cell(row, "hint")
        obj["question"] = f"Hint: {hint}\n{question}" if hint else question
        obj["answer"] = _cell(row, "answer")
        for column, key in (("category", "category"), ("l2-category", "l2_category"), ("split", "split")):
            if _cell(row, column):
                obj[key] = _cell(row, column)
        options = {c: _cell(row, c) for c in OPTION_LETTERS if _cell(row, c)}
        if options:
            obj["options"] = options
            record = parse_record("mcq", obj, where)
        else:
            is_yes_no = obj["answer"].lower() in ("yes", "no")
            obj["answer_type"] = "yes_no" if is_yes_no else "open"
            record = parse_record("vqa", obj, where)
        out.records.append(record)
    return out

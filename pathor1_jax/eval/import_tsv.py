"""`pathor1 eval import-tsv`: VLMEvalKit benchmark TSVs (local files) → our mcq / vqa JSONL.

    pathor1 eval import-tsv PathMMU_VAL.tsv --mcq-out pathmmu_val.jsonl
    pathor1 eval import-tsv PathVQA_TEST.tsv --vqa-out pathvqa_test.jsonl

The layout and the rules are in `pathor1_jax.data.vlmevalkit`.
"""

from __future__ import annotations

import argparse
import json

from pathor1_jax.data.jsonl import write_jsonl
from pathor1_jax.data.records import MCQRecord
from pathor1_jax.data.vlmevalkit import read_vlmevalkit_tsv
from pathor1_jax.errors import UserError
from pathor1_jax.outputs import check_writable_file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("tsv", nargs="+", help="VLMEvalKit TSV file(s)")
    parser.add_argument("--benchmark", default=None, help="benchmark name (default: each file's name)")
    parser.add_argument("--mcq-out", default="", help="write the multiple-choice records to this JSONL file")
    parser.add_argument("--vqa-out", default="", help="write the yes/no and open records to this JSONL file")


def run(args: argparse.Namespace) -> int:
    """Import every file, then write each kind to its output; print the counts as JSON."""
    for flag, out in (("--mcq-out", args.mcq_out), ("--vqa-out", args.vqa_out)):
        if out:
            check_writable_file(out, flag)
    imports = [read_vlmevalkit_tsv(path, args.benchmark) for path in args.tsv]
    records = [r for result in imports for r in result.records]
    mcq = [r for r in records if isinstance(r, MCQRecord)]
    vqa = [r for r in records if not isinstance(r, MCQRecord)]
    for kind, chosen, out in (("mcq", mcq, args.mcq_out), ("vqa", vqa, args.vqa_out)):
        if chosen and not out:
            raise UserError(f"{len(chosen)} {kind} record(s) read but no --{kind}-out file given")
    for chosen, out in ((mcq, args.mcq_out), (vqa, args.vqa_out)):
        if out:
            write_jsonl(out, chosen)
    counts = {path: result.counts() for path, result in zip(args.tsv, imports, strict=True)}
    print(json.dumps(counts))
    return 0

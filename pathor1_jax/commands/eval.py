"""`pathor1 eval TASK ...`: the evaluators, one module per task with `add_arguments` / `run`.

pathor1 eval mcq --model runs/demo/grpo --data demo          # held-out MCQs, greedy
pathor1 eval vlm --model DIR --data pathmmu.jsonl --out runs/eval   # the paper's VLM tables
pathor1 eval import-tsv PathMMU_VAL.tsv --mcq-out pathmmu_val.jsonl
pathor1 eval clip --model DIR --task zeroshot --data F.jsonl --prompts P.json
"""

from __future__ import annotations

import argparse
import importlib

TASKS: dict[str, tuple[str, str]] = {
    "mcq": ("pathor1_jax.eval.mcq", "MCQ accuracy and format rate of a Qwen2.5-VL checkpoint or run"),
    "vlm": ("pathor1_jax.eval.vlm", "the paper's VLM benchmarks (MCQ, yes/no, open-ended with an LLM judge)"),
    "clip": ("pathor1_jax.eval.clip_tasks", "CLIP zero-shot, retrieval Recall@K or few-shot linear probe"),
    "import-tsv": ("pathor1_jax.eval.import_tsv", "VLMEvalKit benchmark TSV files -> mcq / vqa JSONL"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="task", metavar="TASK", required=True)
    for name, (module, help_text) in TASKS.items():
        task_parser = sub.add_parser(name, help=help_text, description=help_text)
        task_parser.set_defaults(task_module=module)
        importlib.import_module(module).add_arguments(task_parser)


def run(args: argparse.Namespace) -> int:
    return importlib.import_module(args.task_module).run(args)

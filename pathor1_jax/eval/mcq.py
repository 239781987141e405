"""Held-out MCQ evaluation: greedy decoding, accuracy and format rate with the RL rewards' rules.

A response is correct when its single `<answer>` block holds exactly the right letter
(`rewards.accuracy_reward`) and well formatted when `rewards.format_reward` is 1. Questions are put
in a prompt style of `pathor1_jax.data.prompts` (default `patho_r1`, the authors' released inference
prompt), with their released budget of 2048 new tokens by default.

    pathor1 eval mcq --model runs/demo/grpo --data demo --split test [--prompt-style patho_r1]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pathor1_jax.data.processing import QwenVLProcessor
from pathor1_jax.data.prompts import DEFAULT_PROMPT_STYLE, PROMPT_STYLES
from pathor1_jax.data.records import MCQRecord
from pathor1_jax.errors import UserError
from pathor1_jax.flags import non_negative_int, positive_int
from pathor1_jax.models import qwen2_5_vl
from pathor1_jax.rl.prompts import decode_response, mcq_prompt
from pathor1_jax.rl.rollout import rollout

MAX_NEW_TOKENS = 2048  # Patho-R1's released inference budget


@dataclasses.dataclass
class MCQResult:
    accuracy: float
    format_rate: float
    num_examples: int
    predictions: list[dict]  # per record: id, answer, response, correct, formatted

    def summary(self) -> dict[str, float]:
        return {"accuracy": self.accuracy, "format_rate": self.format_rate, "num_examples": self.num_examples}


def evaluate_mcq(
    model: qwen2_5_vl.Qwen2_5_VLForConditionalGeneration,
    processor: QwenVLProcessor,
    records: Sequence[MCQRecord],
    *,
    batch_size: int = 8,
    max_new_tokens: int = MAX_NEW_TOKENS,
    prompt_style: str = DEFAULT_PROMPT_STYLE,
    progress: bool = True,
) -> MCQResult:
    """Greedy answers to `records` put in `prompt_style`, in batches of `batch_size` (the last one
    padded by repeating records, whose extra answers are dropped, so every batch has one compiled
    shape)."""
    if not records:
        raise UserError("evaluate_mcq: no MCQ records to evaluate")
    predictions = []
    decode = partial(decode_response, processor)
    for start in tqdm(range(0, len(records), batch_size), desc="eval mcq", disable=not progress):
        chunk = list(records[start : start + batch_size])
        padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
        batch = rollout(
            model,
            [mcq_prompt(processor, r, prompt_style) for r in padded],
            group_size=1,
            max_new_tokens=max_new_tokens,
            decode=decode,
            reward_fn=lambda text, answer, num_tokens: 0.0,
            temperature=0.0,
            pad_token_id=processor.pad_token_id,
        )
        for i, record in enumerate(chunk):
            predictions.append(
                {
                    "id": record.id,
                    "answer": record.answer,
                    "response": batch.texts[i],
                    "correct": bool(batch.correct[i, 0]),
                    "formatted": bool(batch.formatted[i, 0]),
                }
            )
    return MCQResult(
        accuracy=float(np.mean([p["correct"] for p in predictions])),
        format_rate=float(np.mean([p["formatted"] for p in predictions])),
        num_examples=len(predictions),
        predictions=predictions,
    )


def write_predictions(path: str | Path, predictions: Sequence[dict]) -> None:
    """One JSON object per record, written to a temporary file and renamed."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions), encoding="utf-8")
    os.replace(tmp, path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `pathor1 eval mcq`."""
    parser.add_argument("--model", required=True, help="HF checkpoint folder or training run directory")
    parser.add_argument("--data", required=True, help='MCQ JSONL file(s), comma-separated, or "demo"')
    parser.add_argument("--split", default="test", help="split of the embedded demo MCQs (with --data demo)")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument(
        "--max-new-tokens", type=positive_int, default=MAX_NEW_TOKENS, help="default: Patho-R1's 2048"
    )
    parser.add_argument(
        "--prompt-style",
        default=DEFAULT_PROMPT_STYLE,
        choices=sorted(PROMPT_STYLES),
        help=f"how each MCQ is put to the model (default {DEFAULT_PROMPT_STYLE}: the authors' prompt)",
    )
    parser.add_argument(
        "--limit", type=non_negative_int, default=0, help="evaluate the first N records only (0 = all)"
    )
    parser.add_argument("--out", default="", help="write per-record predictions to this JSONL file")


def run(args: argparse.Namespace) -> int:
    """`pathor1 eval mcq`: print accuracy and format rate as JSON; optionally write the predictions."""
    from pathor1_jax.data.demo import demo_records
    from pathor1_jax.data.jsonl import read_jsonl_files
    from pathor1_jax.outputs import check_writable_file
    from pathor1_jax.train.loading import load_for_inference

    if args.out:
        check_writable_file(args.out, "--out")
    records = (
        demo_records("mcq", args.split)
        if args.data == "demo"
        else read_jsonl_files(args.data.split(","), "mcq")
    )
    if not records:
        raise UserError(f"--data {args.data}: no MCQ records")
    records = records[: args.limit] if args.limit else records
    model, processor = load_for_inference(args.model)
    result = evaluate_mcq(
        model,
        processor,
        records,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        prompt_style=args.prompt_style,
    )
    if args.out:
        write_predictions(args.out, result.predictions)
    print(json.dumps(result.summary()))
    return 0

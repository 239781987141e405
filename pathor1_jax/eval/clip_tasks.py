"""`pathor1 eval clip`: zero-shot classification, retrieval Recall@K, few-shot linear probe.

--data is a JSONL file: `{"image": path, "label": class}` per line for zeroshot/fewshot (labels
must be classes of the prompt file), `{"image": path, "caption": text}` for retrieval; relative
image paths are relative to the JSONL file. --model is a HF `CLIPModel` directory, or an open_clip
checkpoint file with --open-clip-model.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from pathor1_jax.data.images import load_image
from pathor1_jax.data.records import ImageRef
from pathor1_jax.errors import UserError
from pathor1_jax.flags import positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="HF CLIPModel directory or open_clip checkpoint file")
    parser.add_argument(
        "--open-clip-model", help="open_clip architecture (ViT-B-16, ViT-L-14) for a checkpoint file"
    )
    parser.add_argument("--task", required=True, choices=("zeroshot", "retrieval", "fewshot"))
    parser.add_argument("--data", required=True, help="JSONL file (see the module doc)")
    parser.add_argument("--test-data", help="fewshot (required): held-out JSONL the probe is scored on")
    parser.add_argument("--prompts", help="zeroshot/fewshot: CONCH-format prompt file")
    parser.add_argument("--out", default="", help="fewshot: box-plot PNG path")
    parser.add_argument("--batch-size", type=positive_int, default=64)


def read_rows(path: str | os.PathLike, field: str) -> list[tuple[ImageRef, str]]:
    rows = []
    base = Path(path).parent
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                image, value = obj["image"], obj[field]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise UserError(
                    f"{path}:{line_no}: expected a JSON object with 'image' and {field!r}: {e}"
                ) from e
            rows.append((ImageRef(path=str(base / image)), str(value)))
    if not rows:
        raise UserError(f"{path}: no records")
    return rows


def _batched(fn, items, batch_size: int) -> np.ndarray:
    return np.concatenate(
        [np.asarray(fn(items[i : i + batch_size])) for i in range(0, len(items), batch_size)]
    )


def run(args: argparse.Namespace) -> int:
    from pathor1_jax.eval import fewshot, retrieval, zeroshot
    from pathor1_jax.models import clip
    from pathor1_jax.models.clip.preprocess import preprocess
    from pathor1_jax.models.clip.tokenizer import CLIPTokenizer
    from pathor1_jax.outputs import check_writable_file

    if args.out:
        check_writable_file(args.out, "--out")
    if args.task != "retrieval" and not args.prompts:
        raise UserError(f"--task {args.task} needs --prompts")
    if args.task == "fewshot" and not args.test_data:
        raise UserError("--task fewshot needs --test-data (never scored on its own training data)")
    field = "caption" if args.task == "retrieval" else "label"
    rows = read_rows(args.data, field)
    if args.task != "retrieval":
        classnames, templates = zeroshot.load_prompts(args.prompts)
    if args.open_clip_model:
        model = clip.load_open_clip(args.model, args.open_clip_model)
    else:
        model = clip.load_pretrained(args.model)
    size = model.config.vision.image_size
    tokenizer = CLIPTokenizer(model.config.text.max_position_embeddings)

    def images_of(rows):
        pixels = [
            preprocess(load_image(ref, record_id=f"{args.data}#{i}"), size) for i, (ref, _) in enumerate(rows)
        ]
        return _batched(lambda b: model.encode_image(np.stack(b)), pixels, args.batch_size)

    def encode_text(texts):
        return _batched(lambda b: model.encode_text(tokenizer(b)), list(texts), args.batch_size)

    if args.task == "retrieval":
        result = retrieval.recall_at_k(images_of(rows), encode_text([c for _, c in rows]))
    else:
        index = {name: i for i, name in enumerate(classnames)}

        def labels_of(rows, path):
            unknown = sorted({label for _, label in rows} - set(index))
            if unknown:
                raise UserError(f"{path}: labels {unknown} are not classes of {args.prompts}")
            return np.array([index[label] for _, label in rows])

        class_embeds = zeroshot.class_embeddings(encode_text, classnames, templates)
        image_embeds, labels = images_of(rows), labels_of(rows, args.data)
        result = zeroshot.zero_shot(image_embeds, class_embeds, labels)
        if args.task == "fewshot":
            test_rows = read_rows(args.test_data, "label")
            test_embeds, test_labels = images_of(test_rows), labels_of(test_rows, args.test_data)
            shots = fewshot.few_shot(image_embeds, labels, test_embeds, test_labels)
            result = {
                "zero_shot_accuracy": result["accuracy"],
                **{
                    f"{s}-shot": {"mean": float(np.mean(a)), "std": float(np.std(a))}
                    for s, a in shots.items()
                },
            }
            if args.out:
                fewshot.plot_few_shot(shots, args.out, zero_shot=result["zero_shot_accuracy"])
    print(json.dumps(result, indent=2))
    return 0

"""`pathor1 generate --model DIR --image F --prompt S`: answer one prompt about one image.

DIR is an HF checkpoint folder (config.json + safetensors, with its own tokenizer files and
`preprocessor_config.json`) or a training run directory (its latest checkpoint, with the run's
tokenizer and image settings), loaded as `pathor1 eval` and `pathor1 serve` do
(`train.loading.load_for_inference`); the prompt is rendered with the Qwen2.5-VL chat template.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from pathor1_jax.errors import UserError
from pathor1_jax.flags import non_negative_float, non_negative_int, positive_int, probability


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="HF checkpoint folder or training run directory")
    parser.add_argument("--image", required=True, help="image file")
    parser.add_argument("--prompt", required=True, help="the question or instruction")
    parser.add_argument("--max-new-tokens", type=positive_int, default=256)
    parser.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=probability, default=1.0, help="nucleus mass in (0, 1]")
    parser.add_argument("--top-k", type=non_negative_int, default=0, help="0 = no top-k cut")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from PIL import Image

    from pathor1_jax.data.records import ChatRecord, ImagePart, ImageRef, Message, TextPart
    from pathor1_jax.models import qwen2_5_vl
    from pathor1_jax.train.loading import load_for_inference

    image_file = Path(args.image)
    try:
        image = Image.open(image_file).convert("RGB")
    except (OSError, ValueError) as e:
        raise UserError(f"--image {image_file}: cannot read the image ({e})") from e
    model, processor = load_for_inference(args.model)
    user = Message("user", (ImagePart(), TextPart(args.prompt)))
    chat = ChatRecord(id=str(image_file), messages=(user,), images=(ImageRef(path=str(image_file)),))
    prompt = processor.encode_prompt(chat, images=[image])
    tokens = qwen2_5_vl.generate(
        model,
        prompt["input_ids"][None],
        None,
        prompt["pixel_values"],
        prompt["image_grid_thw"],
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    print(processor.tokenizer.decode(np.asarray(tokens[0]).tolist(), skip_special_tokens=True))
    return 0

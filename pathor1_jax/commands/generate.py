"""`pathor1 generate --model DIR --image F --prompt S`: answer one prompt about one image.

The checkpoint directory holds the model (config.json + safetensors) and its own tokenizer and
`preprocessor_config.json`; the prompt is rendered with the Qwen2.5-VL chat template.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory (HF layout, safetensors)")
    parser.add_argument("--image", required=True, help="image file")
    parser.add_argument("--prompt", required=True, help="the question or instruction")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)


def expand_image_pads(
    ids: np.ndarray, image_grid_thw: np.ndarray, image_token_id: int, merge: int
) -> np.ndarray:
    """Repeat each `<|image_pad|>` of a 1D id sequence to its image's `prod(grid) / merge²` tokens."""
    counts = np.asarray(image_grid_thw).reshape(-1, 3).prod(-1) // merge**2
    is_pad = ids == image_token_id
    if int(is_pad.sum()) != len(counts):
        raise ValueError(f"prompt has {int(is_pad.sum())} image placeholders for {len(counts)} image(s)")
    repeats = np.ones(ids.shape, dtype=np.int64)
    repeats[is_pad] = counts
    return np.repeat(ids, repeats)


def run(args: argparse.Namespace) -> int:
    from PIL import Image, UnidentifiedImageError

    from pathor1_jax.data.chat_template import render_messages
    from pathor1_jax.data.processing import load_image_processor, load_tokenizer
    from pathor1_jax.models import qwen2_5_vl

    model_dir, image_file = Path(args.model), Path(args.image)
    try:
        model = qwen2_5_vl.load_pretrained(model_dir)
        image = Image.open(image_file).convert("RGB")
    except (ValueError, OSError, UnidentifiedImageError) as e:
        print(f"pathor1 generate: error: {e}", file=sys.stderr)
        return 2
    tokenizer = load_tokenizer(model_dir)
    processor = load_image_processor(model_dir)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.prompt}]}]
    text = render_messages(messages, add_generation_prompt=True)
    processed = processor(images=[image], return_tensors="np")
    grid = np.asarray(processed["image_grid_thw"]).reshape(-1, 3)
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"])
    ids = expand_image_pads(ids, grid, model.config.image_token_id, model.config.vision.spatial_merge_size)
    tokens = qwen2_5_vl.generate(
        model,
        ids[None],
        None,
        np.asarray(processed["pixel_values"], np.float32),
        grid,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    print(tokenizer.decode(np.asarray(tokens[0]).tolist(), skip_special_tokens=True))
    return 0

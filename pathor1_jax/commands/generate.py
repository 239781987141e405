"""`pathor1 generate --model DIR --image F --prompt S`: answer one prompt about one image.

The checkpoint directory holds the model (config.json + safetensors) and its own tokenizer and
`preprocessor_config.json`; the prompt is rendered with the Qwen2.5-VL chat template.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from pathor1_jax.errors import UserError
from pathor1_jax.flags import non_negative_float, non_negative_int, positive_int, probability

# A checkpoint folder's tokenizer: the fast tokenizer file, or the BPE vocabulary and merges.
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory (HF layout, safetensors)")
    parser.add_argument("--image", required=True, help="image file")
    parser.add_argument("--prompt", required=True, help="the question or instruction")
    parser.add_argument("--max-new-tokens", type=positive_int, default=256)
    parser.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=probability, default=1.0, help="nucleus mass in (0, 1]")
    parser.add_argument("--top-k", type=non_negative_int, default=0, help="0 = no top-k cut")
    parser.add_argument("--seed", type=int, default=0)


def check_model_dir(model_dir: Path) -> None:
    """A checkpoint folder with config.json and its own tokenizer files, else a `UserError`."""
    if not (model_dir / "config.json").is_file():
        raise UserError(f"--model {model_dir}: no config.json (expected a HF checkpoint folder)")
    if not any(all((model_dir / f).is_file() for f in files) for files in TOKENIZER_FILES):
        raise UserError(
            f"--model {model_dir}: no tokenizer files (tokenizer.json, or vocab.json + merges.txt); "
            "copy them from the base model's folder"
        )


def run(args: argparse.Namespace) -> int:
    from PIL import Image

    from pathor1_jax.data.processing import QwenVLProcessor
    from pathor1_jax.data.records import ChatRecord, ImagePart, ImageRef, Message, TextPart
    from pathor1_jax.models import qwen2_5_vl

    model_dir, image_file = Path(args.model), Path(args.image)
    check_model_dir(model_dir)
    try:
        image = Image.open(image_file).convert("RGB")
    except (OSError, ValueError) as e:
        raise UserError(f"--image {image_file}: cannot read the image ({e})") from e
    model = qwen2_5_vl.load_pretrained(model_dir)
    processor = QwenVLProcessor(model_dir, model_dir, rope_config=model.config)
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

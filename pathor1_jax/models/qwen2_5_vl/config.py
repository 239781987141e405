"""Qwen2.5-VL configuration, with the field names of the Hugging Face config.json.

`Qwen2_5_VLConfig.from_hf_dict` reads both layouts found in the wild: transformers 5 (nested
`text_config` / `vision_config`) and the original hub files (text fields at the top level with
`rope_scaling.mrope_section`). `to_hf_dict` writes the transformers 5 layout.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pathor1_jax.errors import UserError

MODEL_TYPE = "qwen2_5_vl"


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    depth: int = 32
    hidden_size: int = 1280
    hidden_act: str = "silu"
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    tokens_per_second: int = 2
    window_size: int = 112
    out_hidden_size: int = 3584
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values in one flattened patch: C × T × P × P (1176 for 3 × 2 × 14 × 14)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    hidden_act: str = "silu"
    max_position_embeddings: int = 128000
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)
    bos_token_id: int | None = 151643
    eos_token_id: int | None = 151645
    pad_token_id: int | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VLConfig:
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = False

    def __post_init__(self):
        t, v = self.text, self.vision
        if t.hidden_size % t.num_attention_heads:
            raise ValueError(
                f"text hidden_size {t.hidden_size} not divisible by heads {t.num_attention_heads}"
            )
        if t.num_attention_heads % t.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if 2 * sum(t.mrope_section) != t.head_dim:
            raise ValueError(f"mrope_section {t.mrope_section} must sum to head_dim/2 = {t.head_dim // 2}")
        if v.hidden_size % v.num_heads:
            raise ValueError(f"vision hidden_size {v.hidden_size} not divisible by num_heads {v.num_heads}")
        if v.out_hidden_size != t.hidden_size:
            raise ValueError(
                f"vision out_hidden_size {v.out_hidden_size} != text hidden_size {t.hidden_size}"
            )

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> Qwen2_5_VLConfig:
        model_type = d.get("model_type")
        if model_type != MODEL_TYPE:
            raise UserError(f"unknown model_type {model_type!r}: expected {MODEL_TYPE!r}")
        text_d = dict(d.get("text_config") or d)
        rope = text_d.get("rope_parameters") or text_d.get("rope_scaling") or {}
        text_fields = {f.name for f in dataclasses.fields(TextConfig)}
        text_kwargs = {k: v for k, v in text_d.items() if k in text_fields}
        text_kwargs["rope_theta"] = float(
            rope.get("rope_theta", text_d.get("rope_theta", TextConfig.rope_theta))
        )
        if "mrope_section" in rope:
            text_kwargs["mrope_section"] = tuple(rope["mrope_section"])
        if isinstance(text_kwargs.get("eos_token_id"), list):
            text_kwargs["eos_token_id"] = text_kwargs["eos_token_id"][0]
        vision_d = dict(d.get("vision_config") or {})
        vision_fields = {f.name for f in dataclasses.fields(VisionConfig)}
        vision_kwargs = {k: v for k, v in vision_d.items() if k in vision_fields}
        if "embed_dim" in vision_d and "hidden_size" not in vision_d:
            vision_kwargs["hidden_size"] = vision_d["embed_dim"]
        vrope = vision_d.get("rope_parameters") or {}
        vision_kwargs["rope_theta"] = float(vrope.get("rope_theta", VisionConfig.rope_theta))
        vision_kwargs["fullatt_block_indexes"] = tuple(vision_kwargs.get("fullatt_block_indexes", ()))
        top_fields = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
        top = {k: d[k] for k in top_fields if k in d}
        tie = d.get("tie_word_embeddings", text_d.get("tie_word_embeddings", False))
        return cls(
            text=TextConfig(**text_kwargs),
            vision=VisionConfig(**vision_kwargs),
            tie_word_embeddings=bool(tie),
            **top,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        text = dataclasses.asdict(self.text)
        text.update(
            model_type="qwen2_5_vl_text",
            rope_parameters={
                "rope_type": "default",
                "rope_theta": text.pop("rope_theta"),
                "mrope_section": list(text.pop("mrope_section")),
            },
        )
        vision = dataclasses.asdict(self.vision)
        vision.update(
            model_type="qwen2_5_vl_vision",
            fullatt_block_indexes=list(self.vision.fullatt_block_indexes),
            rope_parameters={"rope_type": "axial", "rope_theta": vision.pop("rope_theta")},
        )
        return {
            "model_type": MODEL_TYPE,
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "text_config": text,
            "vision_config": vision,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
        }


def tiny_config(**text_overrides: Any) -> Qwen2_5_VLConfig:
    """A random-init-sized config for tests and the demo, with the real 151,936-token vocabulary.

    Windows of 56 px (2×2 merged tokens) so that a 112 px image is split into 4 windows, and one
    full-attention block out of two.
    """
    text = dict(
        vocab_size=151936,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        mrope_section=(2, 3, 3),
        max_position_embeddings=4096,
    )
    text.update(text_overrides)
    return Qwen2_5_VLConfig(
        text=TextConfig(**text),
        vision=VisionConfig(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=text["hidden_size"],
            window_size=56,
            fullatt_block_indexes=(1,),
        ),
        tie_word_embeddings=True,
    )

"""Published Qwen2.5-VL sizes (the `config.json` values of Qwen/Qwen2.5-VL-{3B,7B}-Instruct)."""

from __future__ import annotations

from .config import Qwen2_5_VLConfig, TextConfig, VisionConfig, tiny_config

_VISION = dict(
    depth=32,
    hidden_size=1280,
    hidden_act="silu",
    intermediate_size=3420,
    num_heads=16,
    in_channels=3,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    tokens_per_second=2,
    window_size=112,
    fullatt_block_indexes=(7, 15, 23, 31),
)


def qwen2_5_vl_3b() -> Qwen2_5_VLConfig:
    return Qwen2_5_VLConfig(
        text=TextConfig(
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            max_position_embeddings=128000,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            mrope_section=(16, 24, 24),
        ),
        vision=VisionConfig(out_hidden_size=2048, **_VISION),
        tie_word_embeddings=True,
    )


def qwen2_5_vl_7b() -> Qwen2_5_VLConfig:
    return Qwen2_5_VLConfig(
        text=TextConfig(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            max_position_embeddings=128000,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            mrope_section=(16, 24, 24),
        ),
        vision=VisionConfig(out_hidden_size=3584, **_VISION),
        tie_word_embeddings=False,
    )


PRESETS = {"tiny": tiny_config, "3b": qwen2_5_vl_3b, "7b": qwen2_5_vl_7b}


def preset(name: str) -> Qwen2_5_VLConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown Qwen2.5-VL preset {name!r}; presets are {sorted(PRESETS)}")
    return PRESETS[name]()

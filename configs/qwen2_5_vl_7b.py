"""Qwen2.5-VL-7B (the published config.json values) on an FSDP mesh: for `pathor1 shardings`."""

import ml_collections

from pathor1_jax.models.qwen2_5_vl.presets import qwen2_5_vl_7b


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict(
        {"hf_config": qwen2_5_vl_7b().to_hf_dict(), "param_dtype": "float32"}
    )
    config.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    config.sharding = ml_collections.ConfigDict({"preset": "fsdp"})
    return config

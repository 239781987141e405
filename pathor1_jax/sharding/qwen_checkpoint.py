"""Qwen2.5-VL Hugging Face checkpoints loaded directly sharded (each device reads its own slice).

Uses the model's own name mapping (`qwen2_5_vl.checkpoint.parameter_mapping`): Linear kernels
(`[out, in]` in PyTorch) become slice-friendly transposes; other layout changes (the patch
embedding's Conv3d weight) read their tensor whole once and slice it.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from pathor1_jax.models.qwen2_5_vl import checkpoint
from pathor1_jax.models.qwen2_5_vl.modeling import Qwen2_5_VLForConditionalGeneration
from pathor1_jax.sharding.logical import Rules
from pathor1_jax.sharding.params import path_str
from pathor1_jax.sharding.safetensors_load import Source, load_sharded


def _source(m: checkpoint.TensorMapping) -> Source:
    if m.conv_shape is not None:
        return Source(m.name, transform=m.to_ours)
    return Source(m.name, perm=(1, 0)) if m.transpose else Source(m.name)


def load_pretrained_sharded(
    path: str | os.PathLike,
    mesh: Mesh,
    rules: Rules,
    dtype=jnp.float32,
    *,
    param_dtype=None,
    attention_impl: str = "auto",
) -> Qwen2_5_VLForConditionalGeneration:
    """Like `qwen2_5_vl.load_pretrained`, but every parameter is born in its rule-given sharding."""
    config = checkpoint.load_config(path)
    param_dtype = dtype if param_dtype is None else param_dtype

    def make() -> Qwen2_5_VLForConditionalGeneration:
        return Qwen2_5_VLForConditionalGeneration(
            config, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl
        )

    mapping = checkpoint.parameter_mapping(nnx.eval_shape(make))
    sources = {path_str(p): _source(m) for p, m in mapping.items()}
    return load_sharded(make, path, sources, mesh, rules, rename=checkpoint.normalise_hf_name)

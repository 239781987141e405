"""CLIP checkpoints: Hugging Face `CLIPModel` directories and open_clip state dicts → our model.

Both go through HF tensor names: an open_clip state dict is first renamed (and its fused
`in_proj` attention weights split) by `open_clip_to_hf`. Only safetensors, or `.bin`/`.pt` read
with `torch.load(weights_only=True)`; never pickle otherwise, never remote code.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file

from pathor1_jax.errors import UserError
from pathor1_jax.models.scan import layer_paths

from .config import PRESETS, CLIPConfig
from .modeling import CLIPModel


def _hf_name(path: tuple) -> str:
    tower = path[0]
    rest = ".".join(str(p) for p in path[1:])
    if tower not in ("text_model", "vision_model"):
        return ".".join(str(p) for p in path).replace(".kernel", ".weight")
    rest = re.sub(r"^layers\.(\d+)\.(fc1|fc2)\.", r"encoder.layers.\1.mlp.\2.", rest)
    rest = re.sub(r"^layers\.", "encoder.layers.", rest)
    rest = re.sub(r"^(token_embedding|patch_embedding)\.(embedding|kernel)$", r"embeddings.\1.weight", rest)
    rest = re.sub(r"^position_embedding$", "embeddings.position_embedding.weight", rest)
    rest = re.sub(r"^class_embedding$", "embeddings.class_embedding", rest)
    return f"{tower}.{rest}".replace(".kernel", ".weight")


def _to_ours(path: tuple, value: np.ndarray) -> np.ndarray:
    if path[-1] != "kernel":
        return value
    if "patch_embedding" in path:  # Conv2d [D, C, P, P] → [C·P·P, D]
        return np.ascontiguousarray(value.reshape(value.shape[0], -1).T)
    return np.ascontiguousarray(value.T)  # Linear [out, in] → [in, out]


def _fill(
    config: CLIPConfig, tensors: Mapping[str, np.ndarray], where: str, dtype, scan_layers: bool
) -> CLIPModel:
    abstract = nnx.eval_shape(lambda: CLIPModel(config, dtype=dtype, scan_layers=scan_layers))
    graphdef, state = nnx.split(abstract)
    stacks = abstract.layer_stacks()

    def read(path: tuple, shape: tuple[int, ...]) -> np.ndarray:
        name = _hf_name(path)
        if name not in tensors:
            raise UserError(f"{where}: checkpoint has no tensor {name!r}")
        value = _to_ours(path, np.asarray(tensors[name]))
        if tuple(value.shape) != tuple(shape):
            raise UserError(
                f"{where}: tensor {name!r} has shape {tuple(value.shape)}; the config needs {tuple(shape)}"
            )
        return value

    leaves = []
    for path, var in nnx.to_flat_state(state):
        per_layer = layer_paths(path, stacks)  # a stacked variable: each layer's tensor, stacked
        if per_layer is None:
            value = read(path, var.shape)
        else:
            value = np.stack([read(p, var.shape[1:]) for p in per_layer])
        leaves.append((path, var.replace(jnp.asarray(value, dtype=var.dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def load_pretrained(path: str | os.PathLike, dtype=jnp.float32, *, scan_layers: bool = True) -> CLIPModel:
    """A HF `CLIPModel` directory: config.json + model.safetensors (`scan_layers`: see `CLIPModel`)."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise UserError(f"{path}: no config.json")
    config = CLIPConfig.from_hf_dict(json.loads((path / "config.json").read_text()))
    weights = path / "model.safetensors"
    if not weights.exists():
        raise UserError(f"{path}: no model.safetensors (only safetensors checkpoints are read)")
    return _fill(config, load_file(weights), str(path), dtype, scan_layers)


def open_clip_to_hf(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename an open_clip CLIP state dict to HF `CLIPModel` names (splitting fused qkv)."""
    out: dict[str, np.ndarray] = {}
    simple = {
        "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
    }
    norms = {
        "visual.ln_pre": "vision_model.pre_layrnorm",
        "visual.ln_post": "vision_model.post_layernorm",
        "ln_final": "text_model.final_layer_norm",
    }
    block = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
    sub = {
        "ln_1": "layer_norm1",
        "ln_2": "layer_norm2",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
        "attn.out_proj": "self_attn.out_proj",
    }
    for name, value in state.items():
        value = np.asarray(value)
        if name == "logit_scale":
            out[name] = value.reshape(())
        elif name in simple:
            out[simple[name]] = value
        elif name == "visual.proj":
            out["visual_projection.weight"] = value.T
        elif name == "text_projection":
            out["text_projection.weight"] = value.T
        elif name.rsplit(".", 1)[0] in norms:
            prefix, leaf = name.rsplit(".", 1)
            out[f"{norms[prefix]}.{leaf}"] = value
        elif m := block.match(name):
            tower = "vision_model" if m.group(1) else "text_model"
            prefix = f"{tower}.encoder.layers.{m.group(2)}"
            module, leaf = m.group(3).rsplit(".", 1)
            if module == "attn" and leaf in ("in_proj_weight", "in_proj_bias"):
                kind = "weight" if leaf == "in_proj_weight" else "bias"
                for part, chunk in zip(
                    ("q_proj", "k_proj", "v_proj"), np.split(value, 3, axis=0), strict=True
                ):
                    out[f"{prefix}.self_attn.{part}.{kind}"] = chunk
            elif module in sub:
                out[f"{prefix}.{sub[module]}.{leaf}"] = value
            else:
                raise UserError(f"open_clip state dict: unexpected tensor {name!r}")
        elif name != "attn_mask":
            raise UserError(f"open_clip state dict: unexpected tensor {name!r}")
    return out


def load_open_clip(
    file: str | os.PathLike, model_name: str | CLIPConfig, dtype=jnp.float32, *, scan_layers: bool = True
) -> CLIPModel:
    """An open_clip checkpoint file (`.safetensors`, or `.bin`/`.pt` via `torch.load(weights_only=True)`).

    model_name: "ViT-B-16", "ViT-L-14" (OpenAI quick-GELU towers), "tiny", or a `CLIPConfig`.
    open_clip pools text at the largest token id (EOT), which is HF's legacy `eos_token_id == 2` rule.
    """
    file = Path(file)
    if isinstance(model_name, CLIPConfig):
        config = model_name
    elif model_name in PRESETS:
        config = PRESETS[model_name]()
    else:
        raise UserError(f"unknown open_clip model {model_name!r}; known: {sorted(PRESETS)} or a CLIPConfig")
    if not file.exists():
        raise UserError(f"{file}: no such checkpoint file")
    if file.suffix == ".safetensors":
        state = load_file(file)
    elif file.suffix in (".bin", ".pt", ".pth"):
        import torch

        loaded = torch.load(file, map_location="cpu", weights_only=True)
        loaded = loaded.get("state_dict", loaded)
        state = {k.removeprefix("module."): v.float().numpy() for k, v in loaded.items()}
    else:
        raise UserError(f"{file}: expected .safetensors, .bin, .pt or .pth")
    config = dataclasses.replace(config, text=dataclasses.replace(config.text, eos_token_id=2))
    return _fill(config, open_clip_to_hf(state), str(file), dtype, scan_layers)

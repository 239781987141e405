"""Hugging Face checkpoints (config.json + safetensors) ↔ our Flax NNX model.

Tensor names follow the transformers 5 layout (`model.visual.*`, `model.language_model.*`,
`lm_head.weight`); the original hub layout (`visual.*`, `model.layers.*`) is read too. Only
safetensors are read or written: never pickle, never remote code. Checkpoints always hold one
tensor per layer (`model.language_model.layers.3.mlp.up_proj.weight`); a scanned model's stacked
parameter is the stack of its layers' tensors (`models/scan.py`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from pathor1_jax.errors import UserError
from pathor1_jax.models.layers import path_str
from pathor1_jax.models.safetensors_load import CheckpointReader, Source, load_sharded
from pathor1_jax.models.scan import layer_paths

from .config import Qwen2_5_VLConfig
from .modeling import Qwen2_5_VLForConditionalGeneration

log = logging.getLogger(__name__)

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


@dataclasses.dataclass(frozen=True)
class TensorMapping:
    """How one of our parameters is stored in a HF checkpoint: its name(s) and layout change.

    names: the HF tensor, or for a stacked (scanned) parameter `[L, ...]` one tensor per layer.
    transpose: a Linear kernel (PyTorch `[out, in]`, ours `[in, out]`).
    conv_shape: the patch embedding (HF's Conv3d weight of this shape, ours `[C·T·P·P, D]`).
    """

    names: tuple[str, ...]
    stacked: bool = False
    transpose: bool = False
    conv_shape: tuple[int, ...] | None = None

    def to_ours(self, x: np.ndarray) -> np.ndarray:
        if self.conv_shape is not None:
            return np.ascontiguousarray(x.reshape(x.shape[0], -1).T)
        return np.ascontiguousarray(x.T) if self.transpose else x

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        if self.conv_shape is not None:
            return np.ascontiguousarray(x.T.reshape(self.conv_shape))
        return np.ascontiguousarray(x.T) if self.transpose else x


def _hf_name(path: tuple) -> str:
    name = ".".join(str(p) for p in path)
    return name.replace("merger.mlp_0", "merger.mlp.0").replace("merger.mlp_2", "merger.mlp.2").replace(
        "embed_tokens.embedding", "embed_tokens.weight"
    ).replace("patch_embed.kernel", "patch_embed.proj.weight").removesuffix(".kernel") + (
        ".weight" if name.endswith(".kernel") and "patch_embed" not in name else ""
    )


def parameter_mapping(model: Qwen2_5_VLForConditionalGeneration) -> dict[tuple, TensorMapping]:
    """Our parameter path → HF tensor name(s) and transforms (Linear kernels are transposed)."""
    v = model.config.vision
    conv_shape = (v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    stacks = model.layer_stacks()
    mapping = {}
    for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        per_layer = layer_paths(path, stacks)
        names = (_hf_name(path),) if per_layer is None else tuple(_hf_name(p) for p in per_layer)
        if path[-1] == "kernel" and "patch_embed" in path:
            mapping[path] = TensorMapping(names, conv_shape=conv_shape)
        else:
            mapping[path] = TensorMapping(names, per_layer is not None, transpose=path[-1] == "kernel")
    return mapping


def normalise_hf_name(name: str) -> str:
    """Map the original hub layout onto the transformers 5 layout."""
    if name.startswith("visual."):
        return "model." + name
    if name.startswith("model.") and not name.startswith(("model.visual.", "model.language_model.")):
        return "model.language_model." + name[len("model.") :]
    return name


def load_config(path: str | os.PathLike) -> Qwen2_5_VLConfig:
    config_file = Path(path) / "config.json"
    if not config_file.exists():
        raise UserError(f"{path}: no config.json")
    try:
        return Qwen2_5_VLConfig.from_hf_dict(json.loads(config_file.read_text()))
    except (TypeError, json.JSONDecodeError) as e:
        raise UserError(f"{config_file}: {e}") from e


def _source(m: TensorMapping) -> Source:
    """Where the sharded reader finds a parameter: Linear kernels as slice-friendly transposes;
    the patch embedding's Conv3d weight is read whole once and reshaped; a stacked parameter names
    one tensor per layer."""
    name = m.names if m.stacked else m.names[0]
    if m.conv_shape is not None:
        return Source(name, transform=m.to_ours)
    return Source(name, perm=(1, 0)) if m.transpose else Source(name)


def load_pretrained(
    path: str | os.PathLike,
    dtype=jnp.float32,
    *,
    param_dtype=None,
    attention_impl: str = "auto",
    scan_layers: bool = True,
    remat: str = "none",
    shardings: Callable[[nnx.State], nnx.State] | None = None,
) -> Qwen2_5_VLForConditionalGeneration:
    """Read a HF Qwen2.5-VL directory (config.json + model.safetensors or a sharded index).

    dtype: compute dtype; param_dtype: storage dtype of the parameters (default: dtype);
    attention_impl, scan_layers, remat: as `Qwen2_5_VLForConditionalGeneration`.
    shardings: the model's abstract state → each variable's sharding (e.g.
    `sharding.params.state_shardings` with a mesh and rules): every parameter is born sharded, each
    device reading only its slice of each tensor (of each layer's tensor, for stacked layers);
    default: whole arrays on the default device.
    """
    path = Path(path)
    config = load_config(path)
    param_dtype = dtype if param_dtype is None else param_dtype

    def make() -> Qwen2_5_VLForConditionalGeneration:
        return Qwen2_5_VLForConditionalGeneration(
            config,
            dtype=dtype,
            param_dtype=param_dtype,
            attention_impl=attention_impl,
            scan_layers=scan_layers,
            remat=remat,
        )

    if shardings is not None:
        mapping = parameter_mapping(nnx.eval_shape(make))
        sources = {path_str(p): _source(m) for p, m in mapping.items()}
        return load_sharded(make, path, sources, shardings, rename=normalise_hf_name)
    reader = CheckpointReader(path, rename=normalise_hf_name)
    abstract = nnx.eval_shape(make)
    graphdef, state = nnx.split(abstract)
    mapping = parameter_mapping(abstract)

    def read(m: TensorMapping, name: str, shape: tuple[int, ...], ours: str) -> np.ndarray:
        if name not in reader.files:
            raise UserError(f"{path}: checkpoint has no tensor {name!r}")
        value = m.to_ours(reader.read(name))
        if tuple(value.shape) != tuple(shape):
            raise UserError(
                f"{path}: tensor {name!r} has shape {tuple(value.shape)} in the checkpoint "
                f"but the config needs {tuple(shape)} (ours: {ours})"
            )
        return value

    leaves = []
    for param_path, var in nnx.to_flat_state(state):
        m, ours = mapping[param_path], ".".join(map(str, param_path))
        if m.stacked:  # one tensor per layer, stacked on our leading layer axis
            value = np.stack([read(m, name, var.shape[1:], ours) for name in m.names])
        else:
            value = read(m, m.names[0], var.shape, ours)
        leaves.append((param_path, var.replace(jnp.asarray(value, dtype=var.dtype))))
    extra = sorted(set(reader.files) - {name for m in mapping.values() for name in m.names})
    if extra:
        log.warning("%s: ignoring %d tensors the model does not use, e.g. %s", path, len(extra), extra[:3])
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def _to_numpy(x: jax.Array) -> np.ndarray:
    x = np.asarray(jax.device_get(x))
    return x.astype(np.float32) if x.dtype == jnp.bfloat16 else x


def save_pretrained(model: Qwen2_5_VLForConditionalGeneration, path: str | os.PathLike) -> None:
    """Write config.json + model.safetensors that `transformers` loads (written to a temp dir, then renamed).

    bfloat16 parameters are written as float32 (safetensors' numpy writer has no bfloat16).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    mapping = parameter_mapping(model)
    for param_path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        m, value = mapping[param_path], _to_numpy(var[...])
        for i, name in enumerate(m.names):
            tensors[name] = m.to_hf(value[i] if m.stacked else value)
    config = model.config.to_hf_dict()
    config["dtype"] = str(next(iter(tensors.values())).dtype)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_file(tensors, str(tmp / SAFETENSORS), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if path.exists():
            for item in path.iterdir():
                if item.name not in (SAFETENSORS, SAFETENSORS_INDEX, "config.json"):
                    shutil.move(str(item), tmp / item.name)
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

"""`pathor1 shardings`: inspect a sharding layout before launching it.

Builds the model of `--config` abstractly (`nnx.eval_shape`: no parameter memory), lays it out on
a (hypothetical) mesh with the config's rules, and prints each parameter's logical axes,
PartitionSpec and bytes per device, then per-device totals for parameters + the optimizer state the
trainer creates (the config's `optim` block, default AdamW; none for parameters the config's
`freeze` regexes match), laid out as the trainer lays it out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from pathor1_jax.errors import ConfigError
from pathor1_jax.flags import positive_int
from pathor1_jax.sharding.mesh import abstract_mesh, parse_mesh_arg
from pathor1_jax.sharding.report import layout_table
from pathor1_jax.sharding.rules import PRESETS, preset, rules_from_config
from pathor1_jax.train.config import load_config_file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="config file defining get_config() (path.py[:arg])")
    parser.add_argument("--mesh", help="mesh sizes, e.g. data=2,fsdp=4,tensor=1 (default: the config's)")
    parser.add_argument(
        "--devices", type=positive_int, help="hypothetical device count (default: this machine's)"
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), help="rules preset (default: the config's)")
    parser.add_argument(
        "--param-dtype", help="parameter storage dtype, e.g. bfloat16 (default: the config's, else float32)"
    )


def _as_dict(x) -> dict:
    return x.to_dict() if isinstance(x, ml_collections.ConfigDict) else dict(x)


def model_builder(config: ml_collections.ConfigDict, param_dtype):
    """`() -> nnx.Module` for the config's `model` block (Qwen2.5-VL, or CLIP for `stage="clip"`)."""
    from pathor1_jax.models import qwen2_5_vl
    from pathor1_jax.models.qwen2_5_vl import presets

    if config.get("stage") == "clip":
        from pathor1_jax.models import clip
        from pathor1_jax.train.clip_stage import model_config

        cfg = model_config(config.model)
        scan = bool(config.model.get("scan_layers", True))
        return lambda: clip.CLIPModel(cfg, rngs=nnx.Rngs(0), scan_layers=scan)
    model = config.get("model")
    if model is None:
        raise ConfigError("config has no `model` block")
    model = _as_dict(model)
    if model.get("hf_config"):
        cfg = qwen2_5_vl.Qwen2_5_VLConfig.from_hf_dict(_as_dict(model["hf_config"]))
    elif model.get("model_type"):
        cfg = qwen2_5_vl.Qwen2_5_VLConfig.from_hf_dict(model)
    elif model.get("path"):
        config_json = Path(model["path"]) / "config.json"
        if not config_json.exists():
            raise ConfigError(f"config.model.path: {config_json} does not exist")
        cfg = qwen2_5_vl.Qwen2_5_VLConfig.from_hf_dict(json.loads(config_json.read_text()))
    elif model.get("preset"):
        cfg = presets.preset(model["preset"])
    else:
        raise ConfigError(
            "config.model: expected `hf_config` (a HF config.json dict), HF fields with `model_type`, "
            "`path` to a checkpoint folder, or `preset` (tiny, 3b, 7b)"
        )
    scan = bool(model.get("scan_layers", True))  # stacked layers: one row per stacked parameter
    return lambda: qwen2_5_vl.Qwen2_5_VLForConditionalGeneration(
        cfg, rngs=nnx.Rngs(0), param_dtype=param_dtype, scan_layers=scan
    )


def optimizer(config: ml_collections.ConfigDict):
    """The optax transformation the trainer builds for `config` (its `optim` block, else the defaults);
    only its state's shapes matter here, so the schedule's length is immaterial."""
    from pathor1_jax.train.defaults import base_config
    from pathor1_jax.train.optim import make_optimizer

    optim = _as_dict(config.get("optim") or base_config("sft").optim)
    steps = max(int((config.get("train") or {}).get("steps", 0)), int(optim["warmup_steps"]) + 1)
    tx, _ = make_optimizer(optim, steps, tuple(config.get("freeze") or ()))
    return tx


def run(args: argparse.Namespace) -> int:
    config = load_config_file(args.config)
    mesh_config = parse_mesh_arg(args.mesh) if args.mesh else _as_dict(config.get("mesh") or {"fsdp": -1})
    rules = preset(args.preset) if args.preset else rules_from_config(config.get("sharding"))
    num_devices = args.devices or jax.device_count()
    dtype_name = args.param_dtype or (config.get("model") or {}).get("param_dtype") or "float32"
    mesh = abstract_mesh(mesh_config, num_devices)
    abstract = nnx.eval_shape(model_builder(config, jnp.dtype(dtype_name)))
    table, _ = layout_table(nnx.state(abstract), mesh, rules, optimizer(config))
    print(f"config: {args.config}")
    print(f"rules: {list(rules)}")
    print(table)
    return 0

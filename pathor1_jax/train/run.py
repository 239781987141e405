"""A CPT or SFT run from a config (the `cpt` / `sft` entries of `pathor1_jax.stages`): the model,
its data, its starting weights, then `Trainer.fit`. The Qwen2.5-VL helpers here (`model_config`,
`model_factory`, `initial_params`) are shared with the RL stages and evaluation.

`config.stage` picks the step (`cpt` or `sft`); `config.model` is the Qwen2.5-VL (`preset`,
`hf_config` or `path` to a HF checkpoint, plus `dtype` / `param_dtype` / `attention_impl` /
`scan_layers` / `remat`), and
`config.model.init_from` where the weights start: "" (random init), a HF checkpoint folder
(config.json + safetensors), or a previous run's directory (its latest checkpoint's params).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from pathor1_jax.errors import ConfigError
from pathor1_jax.logical import Rules, batch_parts
from pathor1_jax.models import qwen2_5_vl
from pathor1_jax.models.qwen2_5_vl.presets import preset
from pathor1_jax.sharding.mesh import make_mesh
from pathor1_jax.sharding.params import state_shardings
from pathor1_jax.sharding.rules import rules_from_config
from pathor1_jax.train.aot import AotStep, qwen_flops, sds
from pathor1_jax.train.checkpoint import restore_params
from pathor1_jax.train.cpt import cpt_step
from pathor1_jax.train.defaults import layer_options
from pathor1_jax.train.lm import offset_to_block, prepare_batch
from pathor1_jax.train.result import StageResult
from pathor1_jax.train.rundir import check_init_run
from pathor1_jax.train.schema import check_start
from pathor1_jax.train.sft import sft_step
from pathor1_jax.train.step import StepSpec, abstract_state
from pathor1_jax.train.trainer import Stage, Trainer, batch_field_sharding

STEPS = {"cpt": cpt_step, "sft": sft_step}


def model_config(model: ml_collections.ConfigDict) -> qwen2_5_vl.Qwen2_5_VLConfig:
    """The Qwen2.5-VL config named by a `config.model` block."""
    if model.get("hf_config"):
        return qwen2_5_vl.Qwen2_5_VLConfig.from_hf_dict(model.hf_config.to_dict())
    if model.get("path"):
        return qwen2_5_vl.Qwen2_5_VLConfig.from_hf_dict(
            json.loads((Path(model.path) / "config.json").read_text())
        )
    if model.get("preset"):
        return preset(model.preset)
    raise ConfigError("config.model: set one of `preset` (tiny, 3b, 7b), `hf_config` or `path`")


def model_factory(
    model: ml_collections.ConfigDict, cfg: qwen2_5_vl.Qwen2_5_VLConfig
) -> Callable[[], nnx.Module]:
    dtype, param_dtype = jnp.dtype(model.dtype), jnp.dtype(model.param_dtype)
    return lambda: qwen2_5_vl.Qwen2_5_VLForConditionalGeneration(
        cfg, rngs=nnx.Rngs(int(model.seed)), dtype=dtype, param_dtype=param_dtype,
        attention_impl=model.attention_impl, **layer_options(model),
    )  # fmt: skip


def initial_params(
    model: ml_collections.ConfigDict, layout: tuple[Mesh, Rules] | None = None
) -> Callable[[dict], dict] | None:
    """`like_params -> params` loading `model.init_from`, laid out like `like_params`; None = random.

    layout: the run's `(mesh, rules)`; with it a HF checkpoint is read shard by shard (each device only
    its slice), without it whole on the host first.
    """
    source = model.get("init_from") or ""
    if not source:
        return None
    path = Path(source)
    checkpoints = path / "checkpoints"
    if checkpoints.is_dir():
        check_init_run(model, path, lambda m: model_config(m).to_hf_dict())
        return lambda like: restore_params(checkpoints, like)
    if (path / "config.json").exists():

        def from_hf(like: dict) -> dict:
            dtype, param_dtype = jnp.dtype(model.dtype), jnp.dtype(model.param_dtype)
            shardings = None if layout is None else partial(state_shardings, mesh=layout[0], rules=layout[1])
            loaded = qwen2_5_vl.load_pretrained(
                path, dtype, param_dtype=param_dtype, shardings=shardings, **layer_options(model)
            )
            params = nnx.to_pure_dict(nnx.state(loaded, nnx.Param))
            return jax.tree.map(lambda x, ref: jax.device_put(x, ref.sharding), params, like)

        return from_hf
    raise ConfigError(
        f"config.model.init_from={source!r}: neither a HF checkpoint (config.json) nor a run directory "
        "(checkpoints/)"
    )


def shard_iterator(data: ml_collections.ConfigDict, cfg: qwen2_5_vl.Qwen2_5_VLConfig, index: int, count: int):
    """The batches of data shard `index` of `count` (records `index::count`)."""
    from pathor1_jax.data.pipeline import batch_iterator_from_config

    return batch_iterator_from_config(data, cfg, shard=(index, count))


def run_lm(config: ml_collections.ConfigDict, out_dir: str | Path | None = None) -> StageResult:
    """Train the language-model stage `config.stage` (cpt or sft) on `config.data`, writing to
    `out_dir` (default `config.train.out_dir`)."""
    if config.stage not in STEPS:
        raise ConfigError(f"config.stage={config.stage!r}: expected one of {sorted(STEPS)}")
    out_dir = check_start(config, out_dir)
    cfg = model_config(config.model)
    unit = cfg.vision.spatial_merge_size**2
    stage = Stage(
        name=config.stage,
        step=STEPS[config.stage],
        prepare=lambda b: prepare_batch(b, cfg),
        globalize=lambda b, block: offset_to_block(b, block, unit),
    )
    layout = (make_mesh(dict(config.mesh)), rules_from_config(config.get("sharding")))
    init = initial_params(config.model, layout)
    shards = partial(shard_iterator, config.data, cfg)
    trainer = Trainer(config, stage, model_factory(config.model, cfg), shards, out_dir, init)
    return trainer.fit()


def image_patch_budget(data: ml_collections.ConfigDict, cfg: qwen2_5_vl.Qwen2_5_VLConfig) -> int:
    """The most pixel patches one image of `data` can have (`max_pixels`, in patch² units)."""
    return int(data.max_pixels) // cfg.vision.patch_size**2


def lm_aot_step(config: ml_collections.ConfigDict, mesh: Mesh, rules: Rules, num_hosts: int) -> AotStep:
    """The CPT/SFT optimizer step as `pathor1 train` runs it on `mesh` (e.g. over a TPU topology's
    abstract devices) with `num_hosts` processes, each feeding `data.batch_size` rows of
    `data.max_len` tokens and `data.max_patches` image patches per micro-batch, `train.grad_accum`
    micro-batches per step: the jitted step, its spec, and abstract state and batch."""
    from pathor1_jax.train.optim import make_optimizer

    cfg = model_config(config.model)
    freeze = tuple(config.get("freeze") or ())
    tx, _ = make_optimizer(config.optim, max(int(config.train.steps), 1), freeze)
    graphdef, state = abstract_state(model_factory(config.model, cfg), tx, mesh, rules)
    spec = StepSpec(graphdef=graphdef, tx=tx, freeze=freeze)
    data = config.data
    accum, length = int(config.train.grad_accum), int(data.max_len)
    rows, patches = int(data.batch_size) * num_hosts, int(data.max_patches or 0) * num_hosts
    parts = batch_parts(mesh, rules)
    if rows % parts:
        raise ConfigError(
            f"config.data.batch_size={data.batch_size} rows x {num_hosts} hosts = {rows} rows do not split "
            f"over the {parts} devices the rules give the batch"
        )
    unit = cfg.vision.spatial_merge_size**2
    if patches % unit or (num_hosts > 1 and patches % parts):
        raise ConfigError(
            f"config.data.max_patches={data.max_patches}: {patches} patches over {num_hosts} hosts must be a "
            f"multiple of {unit}" + (f" and split over {parts} devices" if num_hosts > 1 else "")
        )
    multi = num_hosts > 1

    def field(key, shape, dtype=np.int32):
        return sds((accum, *shape), dtype, batch_field_sharding(key, mesh, rules, multi))

    batch = {
        "input_ids": field("input_ids", (rows, length)),
        "labels": field("labels", (rows, length)),
        "segment_ids": field("segment_ids", (rows, length)),
        "position_ids": field("position_ids", (3, rows, length)),
        "image_feature_index": field("image_feature_index", (rows, length)),
        "pixel_values": field("pixel_values", (patches, cfg.vision.patch_dim), np.float32)
        if patches
        else None,
        "vision_index": qwen2_5_vl.VisionIndex(
            window_index=field("vision_index", (patches // unit,)),
            window_segment_ids=field("vision_index", (patches,)),
            frame_segment_ids=field("vision_index", (patches,)),
            rotary_pos_ids=field("vision_index", (patches, 2)),
        )
        if patches
        else None,
    }
    flops = accum * qwen_flops(
        cfg,
        state["params"],
        freeze,
        rows=rows,
        length=length,
        patches=patches,
        image_patches=image_patch_budget(data, cfg),
        head_positions=rows * length,
        remat=str(config.model.get("remat", "none")),
    )
    shapes = {"rows": rows * accum, "tokens": rows * length * accum, "patches": patches * accum,
              "micro-batches": accum}  # fmt: skip
    return AotStep(STEPS[config.stage], (spec, state, batch), flops, shapes)

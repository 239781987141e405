"""The defaults every training config starts from (`configs/*.py` change what differs)."""

from __future__ import annotations

import ml_collections

from pathor1_jax.data.pipeline import default_data_config


def layer_options(model: ml_collections.ConfigDict) -> dict:
    """`scan_layers` and `remat` of a `config.model` block, as model constructor arguments. A block
    without `scan_layers` is from a run configured before layers were stacked: its checkpoints hold
    per-layer parameters, so it gets the unrolled model."""
    return {"scan_layers": bool(model.get("scan_layers", False)), "remat": str(model.get("remat", "none"))}


def base_config(stage: str) -> ml_collections.ConfigDict:
    """A complete config for `stage` ("cpt" or "sft"): tiny model, embedded demo data, one device."""
    config = ml_collections.ConfigDict()
    config.stage = stage
    config.model = dict(
        preset="tiny",
        path="",  # HF checkpoint folder whose config.json gives the architecture (instead of preset)
        init_from="",  # "" random | HF checkpoint folder | previous run directory
        dtype="float32",  # compute dtype
        param_dtype="float32",  # master weights
        attention_impl="auto",
        scan_layers=True,  # decoder layers / vision blocks stacked under one scanned body
        remat="none",  # per-layer rematerialisation: none | full | dots | dots_no_batch
        seed=0,
    )
    config.data = default_data_config()
    config.data.kind = ""  # "": the records of `stage` in the stage registry (`stages.run` sets it)
    config.optim = dict(
        lr=1e-5,
        warmup_steps=10,
        min_lr_ratio=0.1,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=0.0,
        clip_norm=1.0,
    )
    config.freeze = ()  # regexes over parameter paths, e.g. (r"^model\.visual\.",)
    config.train = dict(
        steps=100,
        grad_accum=1,
        log_every=1,
        ckpt_every=50,
        keep=2,  # checkpoints kept (>= 1)
        seed=0,
        out_dir=f"runs/{stage}",
        on_nonfinite="stop",  # stop | skip: a non-finite loss/grad/params step (never applied or saved)
        max_nonfinite_skips=10,  # ours: with "skip", such steps in a row before stopping anyway
    )
    config.mesh = dict(data=1, fsdp=-1, tensor=1)
    config.sharding = dict(preset="fsdp", rules=())
    return config

"""PathoCLIP training (Patho-R1 §3.2): CLIP trained contrastively on image–caption pairs, in two
progressive stages — stage I on a morphology-focused corpus, stage II on the full mixture starting
from stage I's weights (`config.model.init_from`).

The run reuses the `Trainer` (checkpoints with the data iterator's state, exact resume, SIGTERM,
metrics, plots). `contrastive_step` is the jitted step: the symmetric InfoNCE of the global batch
(`contrastive.sharded_clip_loss` under a mesh, each device scoring its rows against all others).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from pathor1_jax.data.images import BadImageError, load_image
from pathor1_jax.data.pipeline import Dropped, SkipDropped, prescan
from pathor1_jax.data.records import CaptionRecord
from pathor1_jax.errors import ConfigError
from pathor1_jax.logical import Rules, batch_parts, current_rules, logical_to_spec
from pathor1_jax.models import clip
from pathor1_jax.models.clip.preprocess import preprocess
from pathor1_jax.models.clip.tokenizer import CLIPTokenizer
from pathor1_jax.train.aot import AotStep, clip_flops, sds
from pathor1_jax.train.checkpoint import restore_params
from pathor1_jax.train.contrastive import clip_loss, sharded_clip_loss
from pathor1_jax.train.defaults import layer_options
from pathor1_jax.train.optim import make_optimizer
from pathor1_jax.train.result import StageResult
from pathor1_jax.train.rundir import check_init_run
from pathor1_jax.train.schema import check_start
from pathor1_jax.train.step import StepSpec, abstract_state, apply_gradients, zero_frozen
from pathor1_jax.train.trainer import Stage, Trainer, batch_field_sharding


def base_clip_config() -> ml_collections.ConfigDict:
    """Every key of a PathoCLIP run (configs/pathoclip_*.py change what differs)."""
    config = ml_collections.ConfigDict()
    config.stage = "clip"
    config.model = dict(
        preset="tiny",
        path="",
        open_clip_file="",
        init_from="",
        seed=0,
        dtype="float32",  # compute dtype ("bfloat16" on accelerators); parameters stay float32
        scan_layers=True,  # each tower's layers stacked under one scanned body
        remat="none",  # per-layer rematerialisation: none | full | dots | dots_no_batch
    )
    # batch_size: pairs per data shard; the contrastive batch is all shards' (shards 0: one per process)
    config.data = dict(source="demo", split="train", include="", batch_size=16, shards=0, seed=0,
                       on_bad_image="error")  # fmt: skip
    config.optim = dict(
        lr=5e-4, warmup_steps=5, min_lr_ratio=0.1, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.1, clip_norm=1.0
    )
    config.freeze = ()
    config.train = dict(
        steps=40, grad_accum=1, log_every=1, ckpt_every=20, keep=2, seed=0, out_dir="runs/clip",
        on_nonfinite="stop", max_nonfinite_skips=10,
    )  # fmt: skip
    config.mesh = dict(data=1, fsdp=-1, tensor=1)
    config.sharding = dict(preset="fsdp", rules=())
    return config


def contrastive_loss(model: clip.CLIPModel, images: jax.Array, input_ids: jax.Array) -> jax.Array:
    """The global-batch contrastive loss; under `use_rules` it runs sharded over the batch axes."""
    image_embeds, text_embeds = model.encode_image(images), model.encode_text(input_ids)
    ctx = current_rules()
    batch_axes = None if ctx is None else logical_to_spec(("batch",), ctx[1])[0]
    if batch_axes is None:
        return clip_loss(image_embeds, text_embeds, model.logit_scale[...])
    return sharded_clip_loss(image_embeds, text_embeds, model.logit_scale[...], ctx[0], batch_axes)


def _contrastive_step(spec: StepSpec, state: dict, batch: dict) -> tuple[dict, dict]:
    """One AdamW update on the micro-batch `batch[...][0]` (contrastive losses do not accumulate)."""
    params = state["params"]

    def loss_fn(p):
        return contrastive_loss(nnx.merge(spec.graphdef, p), batch["images"][0], batch["input_ids"][0])

    loss, grads = jax.value_and_grad(loss_fn)(params)
    new_state, update_metrics = apply_gradients(spec, state, zero_frozen(grads, spec.freeze), loss)
    logit_scale = jnp.exp(nnx.merge(spec.graphdef, params).logit_scale[...])
    return new_state, {"loss": loss, "logit_scale": logit_scale, **update_metrics}


contrastive_step = jax.jit(_contrastive_step, static_argnums=0, donate_argnums=1)


def model_options(model: ml_collections.ConfigDict) -> dict:
    """CLIPModel keyword arguments of a `config.model` block: compute dtype, scan and remat."""
    return {"dtype": jnp.dtype(model.get("dtype", "float32")), **layer_options(model)}


def caption_records(data: ml_collections.ConfigDict) -> list[CaptionRecord]:
    """`data.source` ("demo" or a caption JSONL), keeping ids matching the `data.include` regex."""
    from pathor1_jax.data.demo import demo_records
    from pathor1_jax.data.jsonl import read_jsonl

    records = (
        demo_records("caption", data.split) if data.source == "demo" else read_jsonl(data.source, "caption")
    )
    if data.include:
        pattern = re.compile(data.include)
        records = [r for r in records if pattern.search(r.id)]
    if len(records) < data.batch_size:
        raise ConfigError(
            f"config.data: {len(records)} records, fewer than data.batch_size={data.batch_size}"
        )
    return records


def clip_batches(
    records, config: clip.CLIPConfig, batch_size: int, seed: int, on_bad_image: str = "error"
) -> grain.DatasetIterator:
    """Shuffled (a new order each epoch), endless, checkpointable batches of `images [B, H, W, 3]`
    and `input_ids [B, 77]`. A record whose image is bad raises, or with `on_bad_image="skip"` is
    skipped and counted (see `pipeline.SkipDropped`); a sample of them is encoded first (`prescan`)."""
    tokenizer = CLIPTokenizer(config.text.max_position_embeddings)
    size = config.vision.image_size

    def encode(record: CaptionRecord) -> dict | Dropped:
        try:
            image = preprocess(load_image(record.image, record_id=record.id), size)
        except BadImageError as e:
            if on_bad_image != "skip":
                raise
            return Dropped.bad_image(record.id, e)
        return {"images": image, "input_ids": tokenizer(record.caption)[0]}

    prescan(records, encode, what=f"data ({len(records)} caption records)")
    ds = grain.MapDataset.source(records).shuffle(seed=seed).repeat(None).map(encode)
    return iter(SkipDropped(ds.to_iter_dataset()).batch(batch_size, drop_remainder=True))


def model_config(model: ml_collections.ConfigDict) -> clip.CLIPConfig:
    if model.path:
        return clip.CLIPConfig.from_hf_dict(json.loads((Path(model.path) / "config.json").read_text()))
    if model.preset not in clip.config.PRESETS:
        raise ConfigError(
            f"config.model.preset={model.preset!r}: expected one of {sorted(clip.config.PRESETS)}"
        )
    return clip.config.PRESETS[model.preset]()


def initial_params(model: ml_collections.ConfigDict):
    """`like -> params` from `init_from`: a previous run directory (stage II from stage I), a HF
    CLIPModel directory, or an open_clip checkpoint file (`open_clip_file` + `preset`); None: random."""
    source = model.init_from or model.open_clip_file
    if not source:
        return None
    path = Path(source)
    if (path / "checkpoints").is_dir():
        check_init_run(model, path, lambda m: model_config(m).to_hf_dict())
        return lambda like: restore_params(path / "checkpoints", like)
    scan = layer_options(model)["scan_layers"]
    if (path / "config.json").exists():
        loaded = clip.load_pretrained(path, scan_layers=scan)
    elif path.is_file():
        loaded = clip.load_open_clip(path, model.preset, scan_layers=scan)
    else:
        raise ConfigError(f"config.model.init_from={source!r}: not a run directory, HF folder or file")
    params = nnx.to_pure_dict(nnx.state(loaded, nnx.Param))
    return lambda like: jax.tree.map(lambda x, ref: jax.device_put(np.asarray(x), ref.sharding), params, like)


def run_clip(config: ml_collections.ConfigDict, out_dir: str | Path | None = None) -> StageResult:
    out_dir = check_start(config, out_dir)
    cfg = model_config(config.model)
    records = caption_records(config.data)

    def shard(index: int, count: int) -> grain.DatasetIterator:
        batch, seed = int(config.data.batch_size), int(config.data.seed)
        return clip_batches(records[index::count], cfg, batch, seed, config.data.on_bad_image)

    stage = Stage(name="clip", step=contrastive_step, prepare=lambda b: b)
    seed = int(config.model.seed)
    options = model_options(config.model)
    trainer = Trainer(config, stage, lambda: clip.CLIPModel(cfg, rngs=nnx.Rngs(seed), **options), shard,
                      out_dir, initial_params(config.model))  # fmt: skip
    return trainer.fit()


def clip_aot_step(config: ml_collections.ConfigDict, mesh: Mesh, rules: Rules, num_hosts: int) -> AotStep:
    """The contrastive step as `pathor1 train` runs it on `mesh` with `num_hosts` processes, each
    feeding `data.batch_size` image–caption pairs: the jitted step, abstract state and batch."""
    cfg = model_config(config.model)
    freeze = tuple(config.get("freeze") or ())
    tx, _ = make_optimizer(config.optim, max(int(config.train.steps), 1), freeze)

    def build() -> clip.CLIPModel:
        return clip.CLIPModel(cfg, rngs=nnx.Rngs(0), **model_options(config.model))

    graphdef, state = abstract_state(build, tx, mesh, rules)
    rows = int(config.data.batch_size) * num_hosts
    parts = batch_parts(mesh, rules)
    if rows % parts:
        raise ConfigError(
            f"config.data.batch_size={config.data.batch_size} pairs x {num_hosts} hosts = {rows} do not "
            f"split over the {parts} devices the rules give the batch"
        )
    size, length = cfg.vision.image_size, cfg.text.max_position_embeddings

    def field(key, shape, dtype):
        return sds((1, rows, *shape), dtype, batch_field_sharding(key, mesh, rules, num_hosts > 1))

    batch = {
        "images": field("images", (size, size, 3), np.float32),
        "input_ids": field("input_ids", (length,), np.int32),
    }
    spec = StepSpec(graphdef=graphdef, tx=tx, freeze=freeze)
    flops = clip_flops(cfg, state["params"], freeze, rows=rows, remat=str(config.model.get("remat", "none")))
    return AotStep(contrastive_step, (spec, state, batch), flops, {"pairs": rows})

"""The PathoCLIP stage of `pathor1 demo`: stage I (H&E tiles) then stage II (all pairs) of a tiny CLIP
on the embedded captions, with zero-shot tissue classification of the held-out tiles before and after
(prompt file `data/assets/demo/zeroshot_prompts.json`; the class of a tile is its id's prefix)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "pathoclip_tiny.py"
PROMPTS = Path(__file__).resolve().parents[1] / "data" / "assets" / "demo" / "zeroshot_prompts.json"


def zero_shot_accuracy(model, records, prompts_file: Path = PROMPTS) -> float:
    from pathor1_jax.data.images import load_image
    from pathor1_jax.eval.zeroshot import class_embeddings, load_prompts, zero_shot
    from pathor1_jax.models.clip.preprocess import preprocess
    from pathor1_jax.models.clip.tokenizer import CLIPTokenizer

    classnames, templates = load_prompts(prompts_file)
    index = {name: i for i, name in enumerate(classnames)}
    tokenizer = CLIPTokenizer(model.config.text.max_position_embeddings)
    size = model.config.vision.image_size
    pixels = np.stack([preprocess(load_image(r.image, record_id=r.id), size) for r in records])
    labels = np.array([index[r.id.split("-")[0]] for r in records])
    class_embeds = class_embeddings(
        lambda texts: np.asarray(model.encode_text(tokenizer(texts))), classnames, templates
    )
    return zero_shot(np.asarray(model.encode_image(pixels)), class_embeds, labels)["accuracy"]


def clip_demo(out_dir: Path, previous: Path | None, steps: int | None):
    """Both PathoCLIP stages under `out_dir/stage{1,2}`; returns the demo's `StageSummary` (loss of
    stage I's first step → stage II's last step)."""
    from flax import nnx

    from pathor1_jax.commands.demo import StageSummary
    from pathor1_jax.data.demo import demo_records
    from pathor1_jax.models import clip
    from pathor1_jax.train.checkpoint import restore_params
    from pathor1_jax.train.clip_stage import model_config, run_clip
    from pathor1_jax.train.config import load_config

    held_out = demo_records("caption", "test")
    results = {}
    for stage, init in (("stage1", ""), ("stage2", str(out_dir / "stage1"))):
        overrides = [f"--config.train.out_dir={out_dir / stage}", f"--config.model.init_from={init}"]
        if steps is not None:
            overrides += [
                f"--config.train.steps={steps}",
                f"--config.optim.warmup_steps={max(1, steps // 8)}",
            ]
        config = load_config(f"{CONFIG}:{stage}", overrides)
        if stage == "stage1":
            model = clip.CLIPModel(model_config(config.model), rngs=nnx.Rngs(int(config.model.seed)))
            before = zero_shot_accuracy(model, held_out)
        results[stage] = run_clip(config)
    graphdef, params = nnx.split(model, nnx.Param)
    trained = restore_params(out_dir / "stage2" / "checkpoints", nnx.to_pure_dict(params))
    nnx.replace_by_pure_dict(params, trained)
    after = zero_shot_accuracy(nnx.merge(graphdef, params), held_out)
    print(
        f"pathoclip: zero-shot tissue accuracy on {len(held_out)} held-out tiles: "
        f"before {before:.3f}, after {after:.3f}"
    )
    first, last = results["stage1"], results["stage2"]
    return StageSummary(
        "pathoclip",
        "loss",
        first.first_loss,
        last.last_loss,
        first.end_step + last.end_step,
        last.metrics_path,
    )

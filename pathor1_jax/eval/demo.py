"""The held-out numbers `pathor1 demo` prints before and after a stage (the `evaluate` hooks of
`pathor1_jax.stages`): `(config, model_dir | None) -> {name: value}`, where `config` holds the keys
of the stage's config that its `Demo.evaluate_reads` names, `model_dir` is a run directory and None
the model a stage starts from when it starts from scratch."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import ml_collections
import numpy as np

from pathor1_jax.data.records import MCQRecord

PROMPTS = Path(__file__).resolve().parents[1] / "data" / "assets" / "demo" / "zeroshot_prompts.json"
# ours: the 90 held-out MCQs in 2 batches of 45 (`pathor1 eval mcq` defaults to 8): each greedy decode
# step reads the whole 151,936-row LM head whatever the batch, so 12 batches of 8 read it 6x as often.
# Measured on the demo's SFT and GRPO models: the same 90 responses; 7.0 -> 2.7 CPU-s an evaluation
# once compiled (the demo evaluates 3 models), compiling alike (~6.5 CPU-s)
MCQ_BATCH = 45


def held_out_mcq(config: ml_collections.ConfigDict, model_dir: Path | None) -> dict[str, float]:
    """Greedy accuracy and format rate on the embedded held-out MCQs, in the RL stage's prompt style
    and budget (`config.rl.prompt_style`, `max_new_tokens`), with `mcq_breakdown`'s numbers; nothing
    to measure without a starting model."""
    if model_dir is None:
        return {}
    from pathor1_jax.data.demo import demo_records
    from pathor1_jax.eval.mcq import evaluate_mcq
    from pathor1_jax.train.loading import load_for_inference

    model, processor = load_for_inference(model_dir)
    held_out = demo_records("mcq", "test")
    result = evaluate_mcq(
        model,
        processor,
        held_out,
        batch_size=MCQ_BATCH,
        max_new_tokens=int(config.rl.max_new_tokens),
        prompt_style=config.rl.prompt_style,
        progress=False,
    )
    numbers = {"mcq/accuracy": result.accuracy, "mcq/format_rate": result.format_rate}
    return numbers | mcq_breakdown(held_out, result.predictions)


def mcq_breakdown(records: Sequence[MCQRecord], predictions: Sequence[dict]) -> dict[str, float]:
    """The accuracy per question (the record id's last `-` field: `mcq/accuracy_tissue`,
    `mcq/accuracy_density`) and the share of answers that are each option letter (`mcq/answer_A`, ...;
    an answer that is no option letter counts in none) of `evaluate_mcq`'s `predictions` of `records`
    (same order): a model that answers every question alike shows one letter near 1."""
    from pathor1_jax.rl.rewards import extract_answer

    numbers = {}
    questions = [record.id.rsplit("-", 1)[-1] for record in records]
    for question in sorted(set(questions)):
        hits = [p["correct"] for q, p in zip(questions, predictions, strict=True) if q == question]
        numbers[f"mcq/accuracy_{question}"] = float(np.mean(hits))
    answers = [extract_answer(p["response"]) for p in predictions]
    for letter in sorted({letter for record in records for letter in record.options}):
        numbers[f"mcq/answer_{letter}"] = answers.count(letter) / len(answers)
    return numbers


def held_out_zero_shot(config: ml_collections.ConfigDict, model_dir: Path | None) -> dict[str, float]:
    """Zero-shot tissue classification of the embedded held-out tiles by a CLIP (the class of a tile
    is its id's prefix; prompts `data/assets/demo/zeroshot_prompts.json`): the run's latest
    checkpoint, or the random-init model of `config.model` when `model_dir` is None."""
    from flax import nnx

    from pathor1_jax.data.demo import demo_records
    from pathor1_jax.models import clip
    from pathor1_jax.train.checkpoint import restore_params
    from pathor1_jax.train.clip_stage import model_config
    from pathor1_jax.train.defaults import layer_options

    seed = int(config.model.seed)
    model = clip.CLIPModel(model_config(config.model), rngs=nnx.Rngs(seed), **layer_options(config.model))
    if model_dir is not None:
        graphdef, params = nnx.split(model, nnx.Param)
        nnx.replace_by_pure_dict(
            params, restore_params(Path(model_dir) / "checkpoints", nnx.to_pure_dict(params))
        )
        model = nnx.merge(graphdef, params)
    return {"zero_shot/accuracy": zero_shot_accuracy(model, demo_records("caption", "test"))}


def zero_shot_accuracy(model, records, prompts_file: Path = PROMPTS) -> float:
    from pathor1_jax.data.demo import tile_class
    from pathor1_jax.data.images import load_image
    from pathor1_jax.eval.zeroshot import class_embeddings, load_prompts, zero_shot
    from pathor1_jax.models.clip.preprocess import preprocess
    from pathor1_jax.models.clip.tokenizer import CLIPTokenizer

    classnames, templates = load_prompts(prompts_file)
    index = {name: i for i, name in enumerate(classnames)}
    tokenizer = CLIPTokenizer(model.config.text.max_position_embeddings)
    size = model.config.vision.image_size
    pixels = np.stack([preprocess(load_image(r.image, record_id=r.id), size) for r in records])
    labels = np.array([index[tile_class(r.id)] for r in records])
    encode_text, encode_image = _encoders()
    class_embeds = class_embeddings(
        lambda texts: np.asarray(encode_text(model, tokenizer(texts))), classnames, templates
    )
    return zero_shot(np.asarray(encode_image(model, pixels)), class_embeds, labels)["accuracy"]


@functools.cache
def _encoders():
    """The CLIP towers jitted, one program each (run eagerly, each op compiled apart: ~90 compiles
    per evaluation)."""
    from flax import nnx

    return (
        nnx.jit(lambda model, input_ids: model.encode_text(input_ids)),
        nnx.jit(lambda model, pixels: model.encode_image(pixels)),
    )

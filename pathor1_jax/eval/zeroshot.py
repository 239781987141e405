"""Zero-shot classification with CLIP text prompts (the CONCH prompt-file protocol).

A prompt file is JSON: `{"0": {"classnames": {CLASS: [synonym, ...]}, "templates": ["... CLASSNAME ..."]}}`.
A class embedding is the mean, over its synonyms × templates, of the L2-normalised text embeddings,
normalised again; an image is assigned the class of highest cosine similarity.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence

import numpy as np

from pathor1_jax.errors import UserError


def load_prompts(path: str | os.PathLike) -> tuple[dict[str, list[str]], list[str]]:
    """`(classnames: {class: synonyms}, templates)` from a CONCH-format prompt file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bad UTF-8
        raise UserError(f"{path}: cannot read prompt file: {e}") from e
    entry = next(iter(data.values()), None) if isinstance(data, dict) else None
    if not isinstance(entry, dict):
        raise UserError(f'{path}: expected {{"0": {{"classnames": ..., "templates": ...}}}}')
    for key in ("classnames", "templates"):
        if key not in entry:
            raise UserError(f"{path}: prompt file has no {key!r}")
    classnames, templates = entry["classnames"], entry["templates"]
    if not _strings(templates) or any("CLASSNAME" not in t for t in templates):
        raise UserError(
            f"{path}: 'templates' must be a non-empty list of strings that each contain CLASSNAME"
        )
    if not isinstance(classnames, dict) or not classnames:
        raise UserError(f"{path}: 'classnames' must be a non-empty object of class -> [synonym, ...]")
    for name, synonyms in classnames.items():
        if not synonyms:
            raise UserError(f"{path}: class {name!r} has no synonyms")
        if not _strings(synonyms):
            raise UserError(
                f"{path}: class {name!r}: synonyms must be a list of strings, got {synonyms!r:.60}"
            )
    return {k: list(v) for k, v in classnames.items()}, list(templates)


def _strings(value) -> bool:
    """A non-empty list of non-empty strings (a lone string is not: it would iterate as letters)."""
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) and v for v in value)


def normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def class_embeddings(
    encode_text: Callable[[list[str]], np.ndarray], classnames: dict[str, list[str]], templates: Sequence[str]
) -> np.ndarray:
    """`[C, P]`: per class, the renormalised mean of normalised embeddings of synonyms × templates."""
    rows = []
    for synonyms in classnames.values():
        texts = [t.replace("CLASSNAME", s) for s in synonyms for t in templates]
        rows.append(normalize(normalize(encode_text(texts)).mean(axis=0)))
    return np.stack(rows)


def classification_metrics(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> dict[str, float]:
    """Accuracy, balanced accuracy (mean per-class recall over classes present) and weighted F1."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    recalls, f1s, weights = [], [], []
    for c in range(num_classes):
        support = int((labels == c).sum())
        if support == 0:
            continue
        tp = int(((predictions == c) & (labels == c)).sum())
        predicted = int((predictions == c).sum())
        recall = tp / support
        precision = tp / predicted if predicted else 0.0
        recalls.append(recall)
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
        weights.append(support)
    return {
        "accuracy": float((labels == predictions).mean()),
        "balanced_accuracy": float(np.mean(recalls)),
        "weighted_f1": float(np.average(f1s, weights=weights)),
    }


def zero_shot(image_embeds: np.ndarray, class_embeds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Metrics of assigning each image `[N, P]` to its most similar class embedding `[C, P]`."""
    predictions = np.argmax(normalize(image_embeds) @ class_embeds.T, axis=-1)
    return classification_metrics(labels, predictions, class_embeds.shape[0])

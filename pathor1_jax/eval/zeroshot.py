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


def load_prompts(path: str | os.PathLike) -> tuple[dict[str, list[str]], list[str]]:
    """`(classnames: {class: synonyms}, templates)` from a CONCH-format prompt file."""
    try:
        data = json.loads(open(path, encoding="utf-8").read())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read prompt file: {e}") from e
    if not isinstance(data, dict) or not data:
        raise ValueError(f'{path}: expected {{"0": {{"classnames": ..., "templates": ...}}}}')
    entry = next(iter(data.values()))
    for key in ("classnames", "templates"):
        if key not in entry:
            raise ValueError(f"{path}: prompt file has no {key!r}")
    classnames, templates = entry["classnames"], entry["templates"]
    if not templates or any("CLASSNAME" not in t for t in templates):
        raise ValueError(f"{path}: 'templates' must be non-empty and each contain CLASSNAME")
    if not classnames:
        raise ValueError(f"{path}: 'classnames' is empty")
    for name, synonyms in classnames.items():
        if not synonyms:
            raise ValueError(f"{path}: class {name!r} has no synonyms")
    return {k: list(v) for k, v in classnames.items()}, list(templates)


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

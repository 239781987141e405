"""classify: subfields (paper §3.3) by a softmax head on CLIP image + caption embeddings.

Our deviation from the paper: the authors train an EfficientNet on manually labelled images and
iterate with manual corrections. No pretrained EfficientNet can be fetched here, so:
1. features: the project's CLIP (`--clip`: a Hugging Face CLIP / PathoCLIP checkpoint directory)
   image and caption embeddings, each L2-normalised, concatenated; without `--clip` a tiny
   random-init CLIP (seed 0) stands in: plumbing only, colour and wording still separate some classes;
2. seed labels: caption keywords (`data/subfields.json`, ours) give weak labels;
3. a linear softmax head is trained on the labelled rows by a jitted step on the device mesh
   (`jax_ops.train_head`) and predicts every pair;
4. the paper's human in the loop: `review.csv` lists every pair, least confident first, with an empty
   `corrected` column; `--labels review.csv` retrains with the corrected labels (they override the
   keywords) and marks those pairs `subfield_source: manual`.
The 5 kept subfields are the paper's (histopathology, gross, IHC, cytology, FISH); `other` stands for
the 5 it discarded. Later steps use only the 5.
"""

from __future__ import annotations

import csv
import json
import re
from functools import cache
from importlib import resources
from typing import Any

import numpy as np

KEPT = ("histopathology", "gross", "IHC", "cytology", "FISH")


@cache
def subfield_table() -> dict[str, Any]:
    return json.loads(resources.files("pathor1_jax.curation").joinpath("data", "subfields.json").read_text())


def keyword_label(caption: str) -> str | None:
    """The first subfield (in the table's order) whose keyword pattern matches the caption."""
    table = subfield_table()
    for name in table["subfields"]:
        if re.search(table["keywords"][name], caption, re.IGNORECASE):
            return name
    return None


def tissue_system(caption: str) -> str:
    """The caption's tissue system (data/subfields.json `tissue_systems`, ours), or 'unspecified'."""
    for name, pattern in subfield_table()["tissue_systems"].items():
        if not name.startswith("_") and re.search(pattern, caption, re.IGNORECASE):
            return name
    return "unspecified"


def load_clip(path: str | None) -> Any:
    from flax import nnx

    from pathor1_jax.models import clip

    if path:
        return clip.load_pretrained(path)
    return clip.CLIPModel(clip.tiny_config(), rngs=nnx.Rngs(0))


def embed(records: list[dict[str, Any]], model: Any, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised CLIP image and caption embeddings [N, P] of pair records (absolute image paths).

    The encoders run jitted, every chunk padded to one shape (`batch` rows, or N when fewer): one
    compiled program per encoder."""
    from flax import nnx
    from PIL import Image

    from pathor1_jax.models.clip.preprocess import preprocess
    from pathor1_jax.models.clip.tokenizer import CLIPTokenizer

    tokenizer = CLIPTokenizer(model.config.text.max_position_embeddings)
    size = model.config.vision.image_size
    rows = min(batch, len(records))
    encode_image = nnx.jit(lambda m, pixels: m.encode_image(pixels))
    encode_text = nnx.jit(lambda m, ids: m.encode_text(ids))

    def padded(a: np.ndarray) -> np.ndarray:  # [n, ...] -> [rows, ...]
        return np.concatenate([a, np.repeat(a[-1:], rows - len(a), axis=0)])

    img, txt = [], []
    for start in range(0, len(records), rows):
        chunk = records[start : start + rows]
        pixels = []
        for r in chunk:
            with Image.open(r["image"]) as im:
                pixels.append(preprocess(im.convert("RGB"), size))
        ids = tokenizer([r["caption"] for r in chunk])
        img.append(np.asarray(encode_image(model, padded(np.stack(pixels))))[: len(chunk)])
        txt.append(np.asarray(encode_text(model, padded(np.asarray(ids))))[: len(chunk)])

    def norm(a: np.ndarray) -> np.ndarray:
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

    return norm(np.concatenate(img)), norm(np.concatenate(txt))


def read_corrections(path: str, known: set[str]) -> dict[str, str]:
    """id -> corrected subfield from a review CSV (rows with an empty `corrected` are skipped)."""
    names = set(subfield_table()["subfields"])
    out = {}
    with open(path, newline="", encoding="utf-8") as f:
        for lineno, row in enumerate(csv.DictReader(f), start=2):
            value = (row.get("corrected") or "").strip()
            if not value:
                continue
            if value not in names:
                raise ValueError(
                    f"{path}:{lineno}: corrected subfield {value!r} is not one of {sorted(names)}"
                )
            if row.get("id") not in known:
                raise ValueError(f"{path}:{lineno}: id {row.get('id')!r} is not in the input")
            out[row["id"]] = value
    return out


def write_review(path: str, records: list[dict[str, Any]]) -> None:
    from .io import write_csv

    rows = sorted(records, key=lambda r: r["subfield_confidence"])
    write_csv(
        path,
        ["id", "image", "caption", "weak_label", "predicted", "confidence", "corrected"],
        [
            [
                r["id"],
                r["image"],
                r["caption"],
                r.get("weak_label") or "",
                r["subfield"],
                f"{r['subfield_confidence']:.3f}",
                "",
            ]
            for r in rows
        ],
    )

"""Cross-modal retrieval Recall@K in both directions (image→text and text→image)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .zeroshot import normalize


def recall_at_k(
    image_embeds: np.ndarray,
    text_embeds: np.ndarray,
    image_of_text: np.ndarray | None = None,
    ks: Sequence[int] = (1, 5, 10, 20),
) -> dict[str, float]:
    """`{"i2t@k", "t2i@k"}`: the fraction of queries with a true match among the top k.

    image_of_text `[T]`: the image each text describes (default: text i ↔ image i). An image query
    hits if any of its texts is in its top k; a text query hits if its image is in its top k.
    """
    images, texts = normalize(image_embeds), normalize(text_embeds)
    owner = np.arange(len(texts)) if image_of_text is None else np.asarray(image_of_text)
    if len(owner) != len(texts) or owner.max() >= len(images):
        raise ValueError("image_of_text must give, for every text, an image index")
    similarity = images @ texts.T  # [I, T]
    i2t_rank = np.argsort(-similarity, axis=1, kind="stable")  # texts by score, per image
    t2i_rank = np.argsort(-similarity.T, axis=1, kind="stable")  # images by score, per text
    out = {}
    for k in ks:
        out[f"i2t@{k}"] = float(np.mean([(owner[i2t_rank[i, :k]] == i).any() for i in range(len(images))]))
        out[f"t2i@{k}"] = float(np.mean([(t2i_rank[t, :k] == owner[t]).any() for t in range(len(texts))]))
    return out

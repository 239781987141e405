"""CLIP image preprocessing: resize the shortest side (bicubic), center crop, scale to [0, 1],
normalise with CLIP's mean/std; channels last (`[H, W, 3]`), as `CLIPModel.encode_image` takes."""

from __future__ import annotations

import numpy as np
from PIL import Image

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def preprocess(image: Image.Image, size: int) -> np.ndarray:
    """An RGB PIL image → normalised float32 `[size, size, 3]`."""
    image = image.convert("RGB")
    w, h = image.size
    short, long = min(w, h), max(w, h)
    new_long = int(size * long / short)  # truncated, as torchvision and transformers do
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    return (pixels - CLIP_MEAN) / CLIP_STD

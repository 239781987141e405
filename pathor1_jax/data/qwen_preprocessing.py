"""The Qwen2 tokenizer and the Qwen2-VL image processor without importing transformers.

transformers' fast Qwen2 tokenizer runs the `tokenizers` library on the folder's `tokenizer.json`, and
its Qwen2-VL image processor (PIL backend) is PIL's bicubic resize plus numpy; importing transformers
costs a process ~9 CPU-seconds where torch is installed (transformers imports it), more than loading
a tiny model. `QwenTokenizer` and `QwenVLImageProcessor` compute the same ids, offsets, text and
pixels (tests/test_qwen_preprocessing.py holds them against transformers); a tokenizer folder without
`tokenizer.json` (vocab.json + merges.txt only) is still read by transformers.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESSOR_CONFIG = "preprocessor_config.json"


class QwenTokenizer:
    """The calls of transformers' tokenizer that the pipeline, generation and serving make, on a
    `tokenizers.Tokenizer`: `tok(text, return_offsets_mapping=..., split_special_tokens=...)`,
    `decode`, `convert_tokens_to_ids`, `pad_token_id`, `all_special_tokens` (the added tokens marked
    special)."""

    def __init__(self, backend, pad_token: str | None):
        self.backend = backend  # tokenizers.Tokenizer
        added = backend.get_added_tokens_decoder()  # {id: AddedToken}
        self.all_special_tokens = tuple(added[i].content for i in sorted(added) if added[i].special)
        self.pad_token_id = None if pad_token is None else backend.token_to_id(pad_token)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> QwenTokenizer:
        path = Path(path)
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.exists() else {}
        pad = config.get("pad_token")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        if (path / "tokenizer.json").exists():
            from tokenizers import Tokenizer

            return cls(Tokenizer.from_file(str(path / "tokenizer.json")), pad)
        from transformers.models.auto.tokenization_auto import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(os.fspath(path))  # builds the BPE from vocab.json + merges.txt
        return cls(hf.backend_tokenizer, hf.pad_token)

    def __call__(
        self,
        text: str,
        *,
        add_special_tokens: bool = True,
        return_offsets_mapping: bool = False,
        split_special_tokens: bool = False,
    ) -> dict[str, list]:
        """`{"input_ids": [...]}` (and `"offset_mapping"`: each token's [start, end) characters).
        `split_special_tokens`: special-token strings in `text` stay text."""
        self.backend.encode_special_tokens = split_special_tokens
        encoding = self.backend.encode(text, add_special_tokens=add_special_tokens)
        out: dict[str, list] = {"input_ids": encoding.ids}
        if return_offsets_mapping:
            out["offset_mapping"] = encoding.offsets
        return out

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return self.backend.token_to_id(token)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's target size: both sides multiples of `factor`, the area within [min_pixels,
    max_pixels], the aspect ratio kept as closely as possible."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}"
        )
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


class QwenVLImageProcessor:
    """Qwen2-VL image preprocessing of RGB images: bicubic resize to `smart_resize`'s size, scale to
    [0, 1], normalize with the CLIP mean/std, cut into `patch_size`² patches repeated over
    `temporal_patch_size` frames, in `merge_size`² groups (the order the vision merger expects).

    processor(images) → {"pixel_values": [P, 3·T·p·p] float32, "image_grid_thw": [N, 3] int64}
    """

    def __init__(
        self,
        *,
        min_pixels: int = 56 * 56,
        max_pixels: int = 28 * 28 * 1280,
        patch_size: int = 14,
        temporal_patch_size: int = 2,
        merge_size: int = 2,
        image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
        image_std: Sequence[float] = OPENAI_CLIP_STD,
    ):
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.patch_size, self.merge_size = patch_size, merge_size
        self.temporal_patch_size = temporal_patch_size
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides) -> QwenVLImageProcessor:
        """From `path`'s `preprocessor_config.json` (transformers' fields); `overrides` win. Settings
        this processor does not implement (no resize, another filter, ...) are refused by name."""
        file = Path(path) / PREPROCESSOR_CONFIG
        config = json.loads(file.read_text())
        expected = {"do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
                    "resample": 3, "rescale_factor": 1 / 255}  # fmt: skip
        for key, value in expected.items():
            if key in config and config[key] != value:
                raise ValueError(f"{file}: {key}={config[key]!r} is not supported (expected {value!r})")
        size = config.get("size") or {}
        kwargs = {
            "min_pixels": config.get("min_pixels", size.get("shortest_edge")),
            "max_pixels": config.get("max_pixels", size.get("longest_edge")),
            **{k: config.get(k) for k in ("patch_size", "temporal_patch_size", "merge_size")},
            **{k: config.get(k) for k in ("image_mean", "image_std")},
        }
        return cls(**{k: v for k, v in kwargs.items() if v is not None} | overrides)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """`preprocessor_config.json` as transformers writes it (transformers loads it too)."""
        config = {
            "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
            "image_mean": list(self.image_mean), "image_processor_type": "Qwen2VLImageProcessor",
            "image_std": list(self.image_std), "merge_size": self.merge_size, "patch_size": self.patch_size,
            "resample": 3, "rescale_factor": 1 / 255,
            "size": {"longest_edge": self.max_pixels, "shortest_edge": self.min_pixels},
            "temporal_patch_size": self.temporal_patch_size,
        }  # fmt: skip
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / PREPROCESSOR_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    def __call__(self, images: Sequence[Image.Image]) -> dict[str, np.ndarray]:
        """The images' patches, concatenated, and each image's grid."""
        patches, grids = [], []
        for image in images:
            p, grid = self.patchify(self.normalized(image))
            patches.append(p)
            grids.append(grid)
        return {"pixel_values": np.concatenate(patches), "image_grid_thw": np.asarray(grids, dtype=np.int64)}

    def normalized(self, image: Image.Image) -> np.ndarray:
        """`[3, H', W']` float32: resized (PIL bicubic), scaled to [0, 1] (in float64, as transformers
        does), then `(x - mean) / std` in float32."""
        image = image if image.mode == "RGB" else image.convert("RGB")
        factor = self.patch_size * self.merge_size
        height, width = smart_resize(image.height, image.width, factor, self.min_pixels, self.max_pixels)
        resized = np.asarray(image.resize((width, height), resample=Image.BICUBIC))  # [H', W', 3] uint8
        scaled = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)
        mean, std = np.asarray(self.image_mean, np.float32), np.asarray(self.image_std, np.float32)
        return ((scaled - mean) / std).transpose(2, 0, 1)

    def patchify(self, image: np.ndarray) -> tuple[np.ndarray, list[int]]:
        """`[3, H, W]` → `[grid_h·grid_w, 3·T·p·p]` patches (merge groups contiguous), [1, grid_h, grid_w]."""
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        channels, height, width = image.shape
        grid_h, grid_w = height // p, width // p
        x = image.reshape(channels, grid_h // m, m, p, grid_w // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
        x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, *x.shape[5:]))  # one frame, T copies
        return x.reshape(grid_h * grid_w, channels * t * p * p), [1, grid_h, grid_w]

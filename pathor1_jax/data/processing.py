"""Qwen2.5-VL processing of one record into one training example (numpy arrays).

An example is a dict:
    input_ids          [T] int32   chat template rendered, tokenized, each `<|image_pad|>` expanded to
                                   `prod(grid_thw) / merge²` copies
    labels             [T] int32   = input_ids on loss tokens, -100 elsewhere (HF convention: the loss
                                   compares logits[t] with labels[t + 1]); loss tokens are the assistant
                                   turns' content and `<|im_end|>`; image pads never carry loss
    mm_token_type_ids  [T] int32   1 at image-pad tokens, 0 elsewhere
    position_ids       [3, T] int32  M-RoPE positions from `qwen2_5_vl.get_rope_index`
    pixel_values       [P, 1176] float32  patches of all images in order (Qwen2-VL image processor)
    image_grid_thw     [N, 3] int32
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .chat_template import render_pieces, render_with_spans
from .images import BadImageError, load_image
from .prompts import CAPTION_PROMPT, DEFAULT_PROMPT_STYLE, caption_to_chat, mcq_prompt_messages
from .qwen_preprocessing import PREPROCESSOR_CONFIG, QwenTokenizer, QwenVLImageProcessor
from .records import CaptionRecord, ChatRecord, MCQRecord, Record, VQARecord

IGNORE_INDEX = -100
IMAGE_PAD = "<|image_pad|>"
PATCH_DIM = 3 * 2 * 14 * 14  # channels · temporal_patch_size · patch_size²


class ImageCountError(BadImageError):
    """A record whose number of images differs from its number of image placeholders."""


def load_tokenizer(path: str | os.PathLike) -> QwenTokenizer:
    """The Qwen2 tokenizer from a directory (a checkpoint's own files or any tokenizer folder)."""
    return QwenTokenizer.from_dir(path)


def load_image_processor(
    path: str | os.PathLike | None = None, *, min_pixels: int | None = None, max_pixels: int | None = None
) -> QwenVLImageProcessor:
    """The Qwen2-VL image processor: from `path`'s `preprocessor_config.json` when it has one, else the
    Qwen2.5-VL defaults; `min_pixels` / `max_pixels` override."""
    kwargs: dict[str, Any] = {}
    if min_pixels is not None:
        kwargs["min_pixels"] = min_pixels
    if max_pixels is not None:
        kwargs["max_pixels"] = max_pixels
    if path is not None and os.path.exists(os.path.join(os.fspath(path), PREPROCESSOR_CONFIG)):
        return QwenVLImageProcessor.from_pretrained(path, **kwargs)
    return QwenVLImageProcessor(**kwargs)


class QwenVLProcessor:
    """Chat template + tokenizer + image processor → examples (see the module docstring).

    tokenizer_path: directory with the Qwen2 tokenizer files. image_processor_path: directory with a
    `preprocessor_config.json` (None: defaults). rope_config: the model's `Qwen2_5_VLConfig` (for
    token ids and `spatial_merge_size`); None uses the Qwen2.5-VL values with plain M-RoPE math.
    """

    def __init__(
        self,
        tokenizer_path: str | os.PathLike,
        image_processor_path: str | os.PathLike | None = None,
        *,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        rope_config=None,
        caption_prompt: str = CAPTION_PROMPT,
    ):
        from pathor1_jax.models import qwen2_5_vl

        self.tokenizer = load_tokenizer(tokenizer_path)
        self.image_processor = load_image_processor(
            image_processor_path, min_pixels=min_pixels, max_pixels=max_pixels
        )
        self.config = rope_config if rope_config is not None else qwen2_5_vl.tiny_config()
        self.merge_size = int(self.image_processor.merge_size)
        if self.merge_size != self.config.vision.spatial_merge_size:
            raise ValueError(
                f"image processor merge_size {self.merge_size} != model spatial_merge_size "
                f"{self.config.vision.spatial_merge_size}"
            )
        self.image_token_id = int(self.tokenizer.convert_tokens_to_ids(IMAGE_PAD))
        if self.image_token_id != self.config.image_token_id:
            raise ValueError(
                f"tokenizer's {IMAGE_PAD} id {self.image_token_id} != config.image_token_id "
                f"{self.config.image_token_id}"
            )
        self.pad_token_id = int(self.tokenizer.pad_token_id)
        self.special_tokens = tuple(self.tokenizer.all_special_tokens)  # never parsed from message text
        self.caption_prompt = caption_prompt

    def as_chat(self, record: Record) -> ChatRecord:
        if isinstance(record, CaptionRecord):
            return caption_to_chat(record, self.caption_prompt)
        if isinstance(record, (MCQRecord, VQARecord)):
            raise TypeError(
                f"record {record.id!r}: MCQ and VQA records are prompts; convert with prompts.mcq_to_chat "
                "or prompts.question_messages"
            )
        return record

    def tokenize_pieces(self, pieces: list[tuple[str, bool]]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and each token's start character of a rendered chat (`render_pieces`), where
        special-token strings inside message text stay text (`<|im_end|>` → `<`, `|`, `im`, ...):
        only the template's own `<|im_start|>`, `<|image_pad|>`, ... become control tokens. A chat
        whose texts hold no such string is tokenized in one call, exactly as transformers does."""
        if not any(is_text and any(t in piece for t in self.special_tokens) for piece, is_text in pieces):
            pieces = [("".join(p for p, _ in pieces), False)]
        ids: list[int] = []
        starts: list[int] = []
        offset = 0
        for piece, is_text in pieces:
            encoded = self.tokenizer(
                piece, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=is_text
            )
            ids.extend(encoded["input_ids"])
            starts.extend(offset + start for start, _ in encoded["offset_mapping"])
            offset += len(piece)
        return np.asarray(ids, dtype=np.int32), np.asarray(starts, dtype=np.int64)

    def tokenize_chat(self, record: ChatRecord) -> tuple[np.ndarray, np.ndarray]:
        """Token ids (one `<|image_pad|>` per image) and labels of a chat, before image expansion."""
        text, spans = render_with_spans(record)
        pieces = render_pieces(record.messages)
        if "".join(p for p, _ in pieces) != text:
            raise ValueError(f"record {record.id!r}: the chat renders differently piece by piece")
        ids, starts = self.tokenize_pieces(pieces)
        in_span = np.zeros(ids.shape, dtype=bool)
        for lo, hi in spans:
            in_span |= (starts >= lo) & (starts < hi)
        in_span &= ids != self.image_token_id
        labels = np.where(in_span, ids, IGNORE_INDEX).astype(np.int32)
        return ids, labels

    def encode(self, record: Record, images: list | None = None) -> dict[str, np.ndarray]:
        """One example from a caption or chat record; `images` (PIL) are decoded from the record
        when not given. Raises `ImageCountError` when images and placeholders disagree."""
        chat = self.as_chat(record)
        if images is None:
            images = [load_image(ref, record_id=chat.id) for ref in chat.all_images()]
        ids, labels = self.tokenize_chat(chat)
        return self._with_images(chat, ids, labels, images)

    def encode_prompt(
        self, record: MCQRecord | ChatRecord, images: list | None = None, style: str = DEFAULT_PROMPT_STYLE
    ) -> dict[str, np.ndarray]:
        """A generation prompt: an MCQ's prompt turns in prompt `style` (`prompts.mcq_prompt_messages`)
        or a chat's messages, followed by `<|im_start|>assistant\n`. Same arrays as `encode`; labels
        all -100."""
        if isinstance(record, MCQRecord):
            record = ChatRecord(id=record.id, messages=mcq_prompt_messages(record, style))
        if images is None:
            images = [load_image(ref, record_id=record.id) for ref in record.all_images()]
        ids, _ = self.tokenize_pieces(render_pieces(record.messages, add_generation_prompt=True))
        return self._with_images(record, ids, np.full(ids.shape, IGNORE_INDEX, np.int32), images)

    def _with_images(self, chat: ChatRecord, ids: np.ndarray, labels: np.ndarray, images: list) -> dict:
        """Check the image count, run the image processor, expand the image pads, add M-RoPE positions."""
        num_pads = int((ids == self.image_token_id).sum())
        if not num_pads == len(images) == chat.num_placeholders():
            raise ImageCountError(
                f"record {chat.id!r}: {len(images)} image(s) but the chat has {chat.num_placeholders()} "
                f"image placeholder(s) and renders {num_pads} {IMAGE_PAD} token(s)"
            )
        if images:
            try:
                processed = self.image_processor(images)
            except ValueError as e:  # e.g. "absolute aspect ratio must be smaller than 200"
                sizes = ", ".join(f"{im.width}x{im.height}" for im in images)
                raise BadImageError(f"record {chat.id!r}: image processor: {e} (image sizes {sizes})") from e
            pixel_values = np.asarray(processed["pixel_values"], dtype=np.float32)
            grid = np.asarray(processed["image_grid_thw"], dtype=np.int32).reshape(-1, 3)
        else:
            pixel_values = np.zeros((0, PATCH_DIM), dtype=np.float32)
            grid = np.zeros((0, 3), dtype=np.int32)
        counts = grid.prod(axis=-1) // (self.merge_size**2)
        repeats = np.ones(ids.shape, dtype=np.int64)
        repeats[ids == self.image_token_id] = counts
        ids = np.repeat(ids, repeats)
        labels = np.repeat(labels, repeats)
        mm = (ids == self.image_token_id).astype(np.int32)
        return {
            "input_ids": ids,
            "labels": labels,
            "mm_token_type_ids": mm,
            "position_ids": self.position_ids(ids, grid, mm),
            "pixel_values": pixel_values,
            "image_grid_thw": grid,
        }

    def position_ids(self, ids: np.ndarray, grid: np.ndarray, mm: np.ndarray) -> np.ndarray:
        """M-RoPE positions `[3, T]` of one sample (`qwen2_5_vl.get_rope_index`, batch of one)."""
        from pathor1_jax.models import qwen2_5_vl

        positions, _ = qwen2_5_vl.get_rope_index(
            ids[None], grid if len(grid) else None, None, mm[None], self.config
        )
        return np.asarray(positions[:, 0], dtype=np.int32)

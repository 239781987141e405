"""Decoding the images of a record into RGB PIL images, with errors that name the record."""

from __future__ import annotations

import io

from PIL import Image

from pathor1_jax.errors import UserError

from .records import ImageRef


class BadImageError(UserError):
    """An image a record cannot be trained with — unreadable, undecodable, unusable by the image
    processor (e.g. an extreme aspect ratio), or not matching the record's image placeholders. The
    message names the record; `data.on_bad_image="skip"` skips (and counts) such records."""


class ImageDecodeError(BadImageError):
    """An image that cannot be read or decoded; the message names the record and the image."""


def load_image(ref: ImageRef, *, record_id: str) -> Image.Image:
    """Read and fully decode one image as RGB; a missing, unreadable or corrupt file raises
    `ImageDecodeError` naming `record_id` and the path (or "inline bytes")."""
    what = "inline bytes" if ref.data is not None else str(ref.path)
    try:
        image = Image.open(io.BytesIO(ref.data) if ref.data is not None else what)
        image.load()
        return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageDecodeError(f"record {record_id!r}: cannot decode image {what}: {e}") from e


def read_image_bytes(ref: ImageRef, *, record_id: str) -> bytes:
    """The encoded bytes of an image (for embedding in ArrayRecord files)."""
    if ref.data is not None:
        return ref.data
    try:
        with open(str(ref.path), "rb") as f:
            return f.read()
    except OSError as e:
        raise ImageDecodeError(f"record {record_id!r}: cannot read image {ref.path}: {e}") from e

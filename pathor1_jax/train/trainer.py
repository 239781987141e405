"""The training loop shared by the stages: mesh, optimizer, resume, checkpoints, metrics, SIGTERM.

    result = Trainer(config, stage, make_model, data, out_dir).fit()

`config` blocks used here: `train` (steps, grad_accum, log_every, ckpt_every, keep, seed),
`optim` (see `optim.py`), `freeze` (regexes), `mesh` and `sharding` (see `pathor1_jax.sharding`),
`data.shards`. `stage` supplies the jitted step and the host-side preparation of a micro-batch;
`data` makes the input pipeline of one data shard (`(shard, num_shards) -> iterator` of host
micro-batches with `get_state()` / `set_state(state)`); each process feeds its shards' rows of
the global batch (see `data_shards.py`).

A run directory holds `run.json`, `run_config.json`, `checkpoints/`, `metrics.jsonl`,
`tensorboard/` and `loss.png`; it is write-tested and locked for the run, and a directory of another
stage or architecture is refused (`rundir.py`). Starting a run whose directory has a checkpoint
resumes it exactly from the newest intact one (`checkpoint.py`): parameters, optimizer state, step,
RNG and the position of every data shard, on the same or another process layout (orbax lays the
arrays out for the new mesh). SIGTERM (preemption) to any process stops every process at the same
step (they agree at each step), saves one checkpoint and returns with `preempted=True`.

A step whose loss, gradient norm or updated parameters are not finite is not applied (see
`step.apply_gradients`) and never saved: with `train.on_nonfinite="stop"` (default) the run stops
with `DivergenceError`, the last checkpoint intact; with "skip" it goes on, stopping after
`train.max_nonfinite_skips` such steps in a row.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from pathor1_jax.errors import Pathor1Error, UserError
from pathor1_jax.kernels.platform import recording_impls
from pathor1_jax.logical import use_rules
from pathor1_jax.outputs import check_free_space
from pathor1_jax.sharding.mesh import make_mesh
from pathor1_jax.sharding.multihost import (
    PeerFailure,
    any_process,
    batch_block,
    batch_spec,
    is_main_process,
    local_batch_devices,
    peer_failures,
)
from pathor1_jax.sharding.params import create_sharded
from pathor1_jax.sharding.rules import rules_from_config
from pathor1_jax.train.checkpoint import Checkpointer
from pathor1_jax.train.data_shards import ShardedData, ShardFactory
from pathor1_jax.train.metrics import MetricsWriter, plot_losses
from pathor1_jax.train.optim import make_optimizer
from pathor1_jax.train.result import StageResult
from pathor1_jax.train.rundir import RunDir
from pathor1_jax.train.step import StepSpec, abstract_state, params_state

log = logging.getLogger(__name__)

# Where each field of a host micro-batch keeps its rows (split over the mesh's batch axes) and, for
# image patches and their bookkeeping, its patches (the data shards' blocks in order, split the same
# way across several shards, replicated with one). A field in neither table is an error.
ROW_AXIS = {
    "input_ids": 0, "labels": 0, "segment_ids": 0, "attention_mask": 0, "position_ids": 1, "images": 0,
    "image_feature_index": 0,
}  # fmt: skip
PATCH_AXIS = {"pixel_values": 0, "vision_index": 0}


@dataclasses.dataclass(frozen=True)
class Stage:
    """What differs between stages on this loop: the jitted step and the host-side micro-batch
    preparation (name: `config.stage`)."""

    name: str
    step: Callable[[StepSpec, dict, dict], tuple[dict, dict]]
    prepare: Callable[[dict], dict]
    # (prepared micro-batch of one data shard, shard index) → the micro-batch numbered as that
    # shard's block of the global batch (image patches: see `lm.offset_to_block`); None = as is.
    globalize: Callable[[dict, int], dict] | None = None


class DivergenceError(Pathor1Error):
    """A non-finite loss, gradient norm or parameters: the run stopped before saving them."""


class NonFiniteGuard:
    """The `train.on_nonfinite` policy over the steps' `*nonfinite` metrics (1: update not applied)."""

    def __init__(self, train: ml_collections.ConfigDict):
        self.policy = train.get("on_nonfinite", "stop")
        self.max_skips = int(train.get("max_nonfinite_skips", 0))
        self.in_a_row = 0

    def check(self, step: int, metrics: dict, last_saved: int | None) -> bool:
        """False for a healthy step; True for a skipped one; raises `DivergenceError` to stop."""
        if not any(v for k, v in metrics.items() if k.endswith("nonfinite")):
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        shown = ", ".join(f"{k}={metrics[k]:.4g}" for k in ("loss", "grad_norm") if k in metrics)
        what = f"step {step}: non-finite training values ({shown}); the update was not applied"
        if self.policy == "skip" and self.in_a_row <= self.max_skips:
            log.warning("%s (skipped, %d in a row of %d allowed)", what, self.in_a_row, self.max_skips)
            return True
        saved = f"the last checkpoint (step {last_saved}) is intact" if last_saved else "nothing was saved"
        why = (
            f"stopped after {self.in_a_row} such steps in a row (train.max_nonfinite_skips={self.max_skips})"
            if self.policy == "skip"
            else "stopped (train.on_nonfinite=stop)"
        )
        raise DivergenceError(
            f"{what}; {why}; {saved}. Lower optim.lr, or set --config.train.on_nonfinite=skip to step over "
            "rare bad batches"
        )


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


@dataclasses.dataclass
class FitLoop:
    """What a fit loop writes to while its steps run (see `Trainer.fit_loop`)."""

    name: str  # the stage's: the progress bar's, the result's and the plot's label
    writer: MetricsWriter
    guard: NonFiniteGuard
    bar: tqdm
    step: int  # steps taken so far, counting those of the run resumed
    first: float | None = None  # the result's metric at the first step, and at the last
    last: float | None = None
    preempted: bool = False
    preemption: _Preemption | None = None

    def check(self, step: int, metrics: dict, last_saved: int | None) -> bool:
        """`NonFiniteGuard.check`; a step that stops the run is logged first."""
        try:
            return self.guard.check(step, metrics, last_saved)
        except DivergenceError:
            self.writer.write(step, metrics)
            raise


def stack_micro_batches(micro_batches: list[dict]) -> dict:
    """`accum` micro-batches → one dict with a leading `[accum]` axis on every field."""
    keys = micro_batches[0].keys()
    return {k: jax.tree.map(lambda *xs: np.stack(xs), *[m[k] for m in micro_batches]) for k in keys}


def field_axis(key: str) -> int:
    """The axis of a micro-batch field that `merge_shards` and `put_batch` split (rows or patches)."""
    axis = ROW_AXIS.get(key, PATCH_AXIS.get(key))
    if axis is None:
        raise ValueError(
            f"batch field {key!r}: neither a row field {sorted(ROW_AXIS)} nor a patch field "
            f"{sorted(PATCH_AXIS)} of pathor1_jax.train.trainer, so it cannot be split across the mesh"
        )
    return axis


def merge_shards(parts: list[dict]) -> dict:
    """The micro-batches of consecutive data shards as one: rows and patches concatenated."""
    if len(parts) == 1:
        return parts[0]

    def concat(key):
        axis = field_axis(key)
        return jax.tree.map(lambda *xs: np.concatenate(xs, axis=axis), *[p[key] for p in parts])

    return {k: concat(k) for k in parts[0]}


def batch_field_sharding(key: str, mesh: Mesh, rules, split_patches: bool) -> NamedSharding:
    """The layout of a stacked batch field (`[accum, ...]`): rows split over the mesh's batch axes;
    patch fields split the same way when `split_patches` (several data shards: each shard's patches
    are its block of the global batch, see `Stage.globalize`), else replicated."""
    axis = field_axis(key) + 1  # after the leading [accum] axis
    split = key in ROW_AXIS or split_patches
    spec = PartitionSpec(*([None] * axis), batch_spec(rules)[0]) if split else PartitionSpec()
    return NamedSharding(mesh, spec)


def put_batch(batch: dict, mesh: Mesh, rules, split_patches: bool = False) -> dict:
    """Stacked host batch (this process's rows) → global arrays laid out by `batch_field_sharding`."""
    local_parts = local_batch_devices(mesh, rules)
    out = {}
    for key, value in batch.items():
        sharding = batch_field_sharding(key, mesh, rules, split_patches)
        axis = field_axis(key) + 1
        if key in ROW_AXIS and value.shape[axis] % local_parts:
            raise ValueError(
                f"batch field {key!r}: {value.shape[axis]} rows per process do not split over this "
                f"process's {local_parts} devices of mesh axes {batch_spec(rules)[0]!r}"
            )
        out[key] = jax.tree.map(
            lambda x, s=sharding: jax.make_array_from_process_local_data(s, np.asarray(x)), value
        )
    return out


def on_mesh(tree, mesh: Mesh):
    """Leaves not yet laid out on `mesh` (step counters, RNG) replicated on it, so that every step
    sees the same input shardings (and compiles once)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(
        lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, replicated), tree
    )


def where_it_ran(name: str, mesh: Mesh, kernels: Mapping[str, set[str]]) -> str:
    """`<name>: ran on <devices> × <kind> (<platform>); kernels traced: attention pallas_gpu, ...`: the
    devices of the run's mesh and the implementations its kernels traced (`impl="auto"` picks them
    per platform; `kernels.platform.recording_impls`), or "none" when every step was compiled
    earlier in the process or the op has no kernel (a toy model)."""
    device = mesh.devices.flat[0]
    traced = "; ".join(f"{op} {', '.join(sorted(impls))}" for op, impls in sorted(kernels.items()))
    return (
        f"{name}: ran on {mesh.devices.size} × {device.device_kind} ({device.platform}); "
        f"kernels traced: {traced or 'none'}"
    )


class Trainer:
    def __init__(
        self,
        config: ml_collections.ConfigDict,
        stage: Stage,
        make_model: Callable[[], nnx.Module],
        data: ShardFactory | Any,
        out_dir: str | Path,
        init_params: Callable[[dict], dict] | None = None,
    ):
        """data: `(shard index, shard count) -> iterator of host micro-batches` (see `data_shards`;
        `config.data.shards` of them make the global batch), or, for a subclass driving its own
        loop, any object with `get_state()` / `set_state(state)`.
        init_params: maps freshly initialised params to the starting ones (pretrained weights,
        the previous stage's checkpoint); not used when resuming this run's own checkpoint."""
        self.config = config
        self.stage = stage
        self.out_dir = Path(out_dir)
        self.total_steps = int(config.train.steps)
        self.accum = int(config.train.grad_accum)
        self.run_dir = RunDir(self.out_dir, stage.name, config)  # write-tested and locked
        try:
            self._build(make_model, data, init_params)
        except BaseException:
            if hasattr(self, "checkpointer"):
                self.checkpointer.close()
            self.run_dir.release(abandon=True)
            raise

    def _build(self, make_model: Callable[[], nnx.Module], data: ShardFactory | Any, init_params) -> None:
        config = self.config
        self.mesh = make_mesh(dict(config.mesh))
        self.rules = rules_from_config(config.get("sharding"))
        if hasattr(data, "get_state"):
            self.data = data
        else:
            shards = int(config.data.shards)
            self.data = ShardedData(data, shards, batch_block(self.mesh, self.rules))
        freeze = tuple(config.get("freeze") or ())
        tx, self.schedule = make_optimizer(config.optim, self.total_steps, freeze)
        # the state's layout without its values: what a checkpoint or `init_params` fills in
        graphdef, like = abstract_state(make_model, tx, self.mesh, self.rules)
        self.spec = StepSpec(graphdef=graphdef, tx=tx, freeze=freeze)
        state_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(like))
        check_free_space(self.out_dir, state_bytes // max(jax.process_count(), 1), "run directory")
        self.run_dir.claim(like["params"])  # refuses another stage's or architecture's directory
        self.checkpointer = Checkpointer(self.out_dir / "checkpoints", keep=int(config.train.keep))
        restored = self.checkpointer.restore_latest(like)
        self.start_step = self.saved_step = restored[0] if restored is not None else None
        if restored is not None:
            _, self.state, data_state = restored
            self.data.set_state(data_state)
        else:
            self.start_step = 0
            self.state = self._first_state(make_model, tx, like["params"], init_params)

    def _first_state(self, make_model, tx, like_params: dict, init_params) -> dict:
        """Step 0's state: the starting parameters (`_start_params`) with fresh optimizer state."""
        params = self._start_params(make_model, like_params, init_params)
        return on_mesh(params_state(params, tx, int(self.config.train.seed)), self.mesh)

    def _start_params(self, make_model, like_params: dict, init_params) -> dict:
        """The run's starting parameters: `init_params` of the parameters' layout `like_params` (no
        random init to throw away: it compiles for seconds), else the model's random init."""
        if init_params is not None:
            return init_params(like_params)
        with use_rules(self.mesh, self.rules):
            model = create_sharded(make_model, self.mesh, self.rules)
        return nnx.to_pure_dict(nnx.state(model, nnx.Param))

    def num_params(self) -> tuple[int, int]:
        """(total, trainable) parameter counts."""
        from pathor1_jax.train.optim import FROZEN, param_labels

        params = self.state["params"]
        labels = jax.tree.leaves(param_labels(params, self.spec.freeze))
        sizes = [int(np.prod(p.shape)) for p in jax.tree.leaves(params)]
        return sum(sizes), sum(s for s, lab in zip(sizes, labels, strict=True) if lab != FROZEN)

    def _next_batch(self) -> tuple[dict, int]:
        """`grad_accum` micro-batches (this process's data shards prepared, numbered as their blocks of
        the global batch and merged) stacked, and the non-padding tokens of all processes (the
        examples, for batches without `segment_ids`)."""
        micro = []
        for _ in range(self.accum):
            parts = []
            for shard, batch in next(self.data):
                prepared = self.stage.prepare(batch)
                if self.stage.globalize is not None:
                    prepared = self.stage.globalize(prepared, shard)
                parts.append(prepared)
            micro.append(merge_shards(parts))
        local = sum(
            int((m["segment_ids"] != 0).sum()) if "segment_ids" in m else len(m["input_ids"]) for m in micro
        )
        return stack_micro_batches(micro), local * self.data.block[1]

    def peer_failures(self):
        """Errors from a lost process become `PeerFailure`s that say what to do."""
        return peer_failures(
            f"the last complete checkpoint under {self.checkpointer.directory} is intact; rerun the same "
            "command to resume from it"
        )

    def save(self, step: int, data_state) -> None:
        """Checkpoint `step` (once: a step already saved, e.g. the one resumed from, is skipped)."""
        if step != self.saved_step:
            self.checkpointer.save(step, self.state, data_state)
            self.saved_step = step

    def _drop_counts(self) -> dict[str, float]:
        """`data/skipped`, `data/dropped`: records the data left out so far (when it counts them)."""
        counts = getattr(self.data, "drop_counts", None)
        return {f"data/{kind}": float(n) for kind, n in counts().items()} if counts else {}

    @contextlib.contextmanager
    def fit_loop(self, total: int, name: str) -> Iterator[FitLoop]:
        """The frame a fit loop runs its steps in (this one's and `rl.train.RLTrainer`'s): the metrics
        log, the non-finite guard, a progress bar to `total`, SIGTERM recorded as a preemption, the
        mesh's rules and a lost process's errors as `PeerFailure`; after the steps, the saves in flight
        awaited. However the loop ends, the bar, checkpointer (not after a lost process: a save in
        flight cannot complete without it), log and run directory are closed."""
        loop = FitLoop(
            name=name,
            writer=MetricsWriter(self.out_dir, resume_step=self.start_step),
            guard=NonFiniteGuard(self.config.train),
            bar=tqdm(
                total=total,
                initial=self.start_step,
                desc=name,
                disable=not is_main_process(),
                dynamic_ncols=True,
            ),
            step=self.start_step,
        )
        lost_peer = False
        try:
            with (
                _Preemption() as loop.preemption,
                use_rules(self.mesh, self.rules),
                self.peer_failures(),
                recording_impls() as kernels,
            ):
                yield loop
                self.checkpointer.wait()
            loop.bar.close()  # its last line before the one below (`finally` closing it again is harmless)
            if is_main_process():
                print(where_it_ran(name, self.mesh, kernels), file=sys.stderr)
        except PeerFailure:
            lost_peer = True
            raise
        finally:
            loop.bar.close()
            try:
                if not lost_peer:
                    self.checkpointer.close()
                loop.writer.close()
            finally:
                self.run_dir.release()

    def result(self, loop: FitLoop, metric: str, plot: str) -> StageResult:
        """The finished loop's summary (`metric`: what its `first` and `last` are); unless preempted, the
        main process plots `metric`'s curve to `plot` in the run directory."""
        if is_main_process() and not loop.preempted and loop.writer.path.exists():
            plot_losses([(loop.name, loop.writer.path)], self.out_dir / plot, key=metric)
        return StageResult(
            stage=loop.name,
            out_dir=self.out_dir,
            metrics_path=loop.writer.path,
            start_step=self.start_step,
            end_step=loop.step,
            metric=metric,
            first=loop.first,
            last=loop.last,
            preempted=loop.preempted,
        )

    def fit(self) -> StageResult:
        cfg = self.config.train
        with self.fit_loop(self.total_steps, self.stage.name) as loop:
            while loop.step < self.total_steps:
                t0 = time.perf_counter()
                position = self.data.local_state()
                try:
                    host_batch, tokens = self._next_batch()
                except StopIteration:  # a finite data config (data.num_epochs) ran out
                    host_batch = None
                # every process stops at the same step: on a SIGTERM to any of them (preemption),
                # or when any one's data runs out
                loop.preempted, exhausted = any_process(loop.preemption.requested, host_batch is None)
                if loop.preempted or exhausted:
                    if exhausted and loop.step == 0:
                        raise UserError(
                            f"{self.stage.name}: the data gave no batch at all (data.num_epochs, source?)"
                        )
                    if exhausted:
                        print(f"{self.stage.name}: data exhausted after step {loop.step}", file=sys.stderr)
                    self.save(loop.step, self.data.gather_state(position))
                    loop.preempted = loop.preempted and not exhausted
                    break
                split = self.data.num_shards > 1
                batch = put_batch(host_batch, self.mesh, self.rules, split_patches=split)
                self.state, metrics = self.stage.step(self.spec, self.state, batch)
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                dt = time.perf_counter() - t0
                loop.step += 1
                metrics.update(
                    lr=float(self.schedule(loop.step - 1)), tokens_per_s=tokens / dt, step_time_s=dt
                )
                metrics.update(self._drop_counts())
                skipped = loop.check(loop.step, metrics, self.checkpointer.latest_step())  # or stops
                if skipped or loop.step % int(cfg.log_every) == 0 or loop.step in (1, self.total_steps):
                    loop.writer.write(loop.step, metrics)
                if not skipped:
                    loop.first = metrics["loss"] if loop.first is None else loop.first
                    loop.last = metrics["loss"]
                loop.bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{tokens / dt:,.0f}")
                loop.bar.update(1)
                if loop.step % int(cfg.ckpt_every) == 0 or loop.step == self.total_steps:
                    self.save(loop.step, self.data.get_state())
        return self.result(loop, metric="loss", plot="loss.png")

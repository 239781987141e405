"""Run checkpoints with orbax: the train state (params, optimizer, step, RNG) and the data iterator.

`<run>/checkpoints/<step>/` holds two items: `state` (the train-state pytree, `StandardSave`) and
`data` (the iterator's state as JSON). Saves are asynchronous and the last `keep` (>= 1) are kept.
Orbax writes each step into a temporary folder and renames it when complete, so a crash mid-save
leaves the previous step as the latest loadable one (`latest_step` never returns a partial save).

Integrity: once a step is complete, every file in it gets a CRC-32 and its size in
`<step>/checksums.json` (computed in a background thread, process 0). `restore_latest` restores the
newest step that verifies and loads; a newer step that fails (checksum, missing or truncated file,
unreadable metadata) while an older one loads into the same state is reported and moved to
`<run>/damaged_checkpoints/`, so that the run goes on from the intact one. A step without checksums
(a crash right after its save) is restored unverified.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from pathor1_jax.errors import ConfigError, Pathor1Error

log = logging.getLogger(__name__)

STATE, DATA = "state", "data"
CHECKSUMS = "checksums.json"
DAMAGED = "damaged_checkpoints"  # beside `checkpoints/`: steps that failed verification or loading
_BYTES = "__bytes_b64__"
_CHUNK = 1 << 24


def _to_json(data_state: Any) -> Any:
    if isinstance(data_state, bytes):
        return {_BYTES: base64.b64encode(data_state).decode("ascii")}
    return data_state


def _from_json(data_state: Any) -> Any:
    if isinstance(data_state, dict) and set(data_state) == {_BYTES}:
        return base64.b64decode(data_state[_BYTES])
    return data_state


def abstract_like(tree: Any) -> Any:
    """Shape/dtype/sharding placeholders of `tree` (what restore fills in, laid out the same)."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class CheckpointDamaged(Pathor1Error):
    """A checkpoint step whose files do not match their checksums (or are missing)."""


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != CHECKSUMS)


def write_checksums(step_dir: str | Path) -> None:
    """`<step_dir>/checksums.json`: `{relative path: [size, crc32]}` of every file of the step."""
    step_dir = Path(step_dir)
    files = {str(p.relative_to(step_dir)): [p.stat().st_size, _crc32(p)] for p in _files(step_dir)}
    tmp = step_dir / f".{CHECKSUMS}.tmp"
    tmp.write_text(json.dumps({"algorithm": "crc32", "files": files}))
    os.replace(tmp, step_dir / CHECKSUMS)


def verify_checksums(step_dir: str | Path) -> bool:
    """True when the step matches its checksums, False when it has none (unverified);
    raises `CheckpointDamaged` naming the first file that is missing, truncated or altered."""
    step_dir = Path(step_dir)
    manifest = step_dir / CHECKSUMS
    if not manifest.exists():
        return False
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointDamaged(f"{manifest}: unreadable ({e})") from e
    for name, (size, crc) in files.items():
        path = step_dir / name
        if not path.is_file():
            raise CheckpointDamaged(f"{path}: missing")
        if path.stat().st_size != size:
            raise CheckpointDamaged(f"{path}: {path.stat().st_size} bytes, {size} when saved")
        if _crc32(path) != crc:
            raise CheckpointDamaged(f"{path}: contents differ from when it was saved (CRC-32)")
    return True


def _reason(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}"


class Checkpointer:
    """Async keep-N checkpoints of `(train_state, data_state)` under `directory`, with checksums."""

    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True):
        if int(keep) < 1:
            raise ConfigError(f"train.keep={keep}: must be >= 1 (a run keeps at least its latest checkpoint)")
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=(STATE, DATA))
        self._unhashed: list[int] = []  # saved steps whose checksums are not written yet
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checksums")
        self._hashing: list[Future] = []

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: dict, data_state: Any = None) -> None:
        """Start saving step `step` (returns before the write completes when async)."""
        self._checksum_completed()
        self.manager.save(
            step,
            args=ocp.args.Composite(
                **{STATE: ocp.args.StandardSave(state), DATA: ocp.args.JsonSave(_to_json(data_state))}
            ),
            force=True,
        )
        self._unhashed.append(step)

    def _checksum_completed(self) -> None:
        """Wait for the saves in flight, then checksum them in the background (process 0)."""
        if not self._unhashed:
            return
        self.manager.wait_until_finished()
        if jax.process_index() == 0:
            for step in self._unhashed:
                self._hashing.append(self._hasher.submit(self._write_checksums, step))
        self._unhashed.clear()

    def _write_checksums(self, step: int) -> None:
        try:
            write_checksums(self.directory / str(step))
        except FileNotFoundError:  # rotated away (keep) while being read: nothing to protect
            pass

    def restore(self, step: int, like: dict) -> tuple[dict, Any]:
        """`(state, data_state)` of `step`, laid out like the abstract or concrete tree `like`."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                **{STATE: ocp.args.StandardRestore(abstract_like(like)), DATA: ocp.args.JsonRestore()}
            ),
        )
        return restored[STATE], _from_json(restored[DATA])

    def restore_latest(self, like: dict) -> tuple[int, dict, Any] | None:
        """`(step, state, data_state)` of the newest intact step (None: no checkpoint). Newer steps
        that fail are logged and moved to `damaged_checkpoints/`; when none loads, `Pathor1Error`."""
        step, restored, failed = restore_newest_intact(self.directory, self.all_steps(), self.restore, like)
        if restored is None:
            return None
        if failed:
            if jax.process_index() == 0:
                for bad, _ in failed:
                    quarantine(self.directory, bad)
            if jax.process_count() > 1:  # every process lists the steps after the move
                multihost_utils.sync_global_devices("pathor1_quarantine_damaged_checkpoints")
            self.manager.reload()
        return step, restored[0], restored[1]

    def wait(self) -> None:
        """Wait until every save, and its checksums, is on disk."""
        self.manager.wait_until_finished()
        self._checksum_completed()
        for future in self._hashing:
            future.result()
        self._hashing.clear()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._hasher.shutdown(wait=True)
            self.manager.close()


def restore_newest_intact(directory: Path, steps: list[int], restore, like) -> tuple[int | None, Any, list]:
    """Try `restore(step, like)` from the newest step down, after checking each step's checksums.

    Returns `(step, restored, failed)` with `failed` the newer steps that did not load, as
    `(step, reason)`; `(None, None, [])` when there are no steps. When no step loads, raises
    `Pathor1Error` listing why each failed: a state that does not fit the checkpoint (another
    optimizer or freeze pattern) is a config problem, not damage, and is never moved away.
    """
    failed: list[tuple[int, str]] = []
    for step in sorted(steps, reverse=True):
        try:
            verified = verify_checksums(directory / str(step))
            restored = restore(step, like)
        except Exception as e:  # orbax/tensorstore raise many kinds for unreadable files
            reason = _reason(e)
            log.warning("checkpoint %s/%d cannot be restored: %s", directory, step, reason)
            failed.append((step, reason))
            continue
        if not verified:
            log.warning("checkpoint %s/%d has no %s: restored unverified", directory, step, CHECKSUMS)
        for bad, reason in failed:
            log.error("checkpoint %s/%d is damaged (%s); resuming from step %d", directory, bad, reason, step)
        return step, restored, failed
    if failed:
        lines = "; ".join(f"step {s}: {r}" for s, r in failed)
        raise Pathor1Error(
            f"no checkpoint under {directory} can be restored ({lines}). If the config changed, "
            "restore it; to start over, use a new run directory (or move this one away)"
        )
    return None, None, []


def quarantine(directory: Path, step: int) -> Path:
    """Move `directory/<step>` to `<run>/damaged_checkpoints/<step>[-n]`, out of orbax's sight."""
    target_dir = directory.parent / DAMAGED
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / str(step)
    if target.exists():
        target = target_dir / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    shutil.move(str(directory / str(step)), str(target))
    log.error("moved damaged checkpoint step %d to %s", step, target)
    return target


def restore_params(directory: str | Path, like_params: dict, step: int | None = None) -> dict:
    """Only the parameters of a run's checkpoint (the newest intact step unless given), laid out
    like `like_params`: how a stage starts from the previous stage's result (whose optimizer state,
    e.g. with other parameters frozen, need not match this stage's). The other run is only read."""
    directory = Path(directory).absolute()
    manager = ocp.CheckpointManager(directory, item_names=(STATE, DATA))
    try:
        steps = list(manager.all_steps()) if step is None else [step]
        if not steps:
            raise FileNotFoundError(f"no complete checkpoint under {directory}")
        like = {"params": abstract_like(like_params)}
        restore_args = jax.tree.map(
            lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype), like
        )

        def restore(s: int, like: dict) -> dict:
            args = ocp.args.PyTreeRestore(like, restore_args=restore_args, partial_restore=True)
            return manager.restore(s, args=ocp.args.Composite(**{STATE: args}))[STATE]["params"]

        _, params, _ = restore_newest_intact(directory, steps, restore, like)
        return params
    finally:
        manager.close()

"""Output locations checked before any work: created, then written to, synced and cleaned up, so an
unwritable or full location is a one-line error at start-up instead of lost results at the end.

    out_dir = check_writable_dir(config.train.out_dir, "config.train.out_dir")
    check_writable_file(args.out, "--out")
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from pathor1_jax.errors import UserError

PROBE_BYTES = 64 * 1024  # enough to meet a full disk (small writes can fit in a last block)


def is_remote(path: str | os.PathLike) -> bool:
    """A URL (`gs://...`): written by the checkpoint library, not checked here."""
    return "://" in os.fspath(path)


def _probe(folder: Path, label: str) -> None:
    """Create `folder` and write, sync and delete a probe file in it; `UserError(label: ...)`."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError as e:
        raise UserError(f"{label}: {folder} exists and is not a directory") from e
    except OSError as e:
        raise UserError(f"{label}: cannot create the directory {folder} ({e.strerror or e})") from e
    probe = folder / f".write_test.{uuid.uuid4().hex}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * PROBE_BYTES)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise UserError(f"{label}: cannot write in {folder} ({e.strerror or e})") from e
    finally:
        probe.unlink(missing_ok=True)


def check_writable_dir(path: str | os.PathLike, what: str, *, keep: bool = True) -> Path:
    """`path` created (with parents) and write-tested; a `UserError` naming `what` otherwise.
    keep=False removes again the (empty) folders this check created: a test before other checks
    that must leave nothing behind when they fail."""
    path = Path(path)
    if is_remote(path):
        return path
    created = [p for p in (path, *path.parents) if not p.exists()]
    try:
        _probe(path, f"{what} {path}")
    finally:
        if not keep:
            for folder in created:  # deepest first
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
    return path


def check_writable_file(path: str | os.PathLike, what: str) -> Path:
    """The folder of output file `path` created and write-tested; `path` must not be a folder."""
    path = Path(path)
    if is_remote(path):
        return path
    if path.is_dir():
        raise UserError(f"{what} {path}: is a directory, expected a file path")
    _probe(path.parent, f"{what} {path}")
    return path


def check_free_space(path: str | os.PathLike, needed_bytes: int, what: str) -> None:
    """`UserError` when the file system of `path` has less than `needed_bytes` free."""
    if is_remote(path):
        return
    free = shutil.disk_usage(path).free
    if free < needed_bytes:
        raise UserError(
            f"{what} {path}: {free / 2**30:.2f} GiB free on its disk, but {needed_bytes / 2**30:.2f} GiB "
            "are needed; free some space or choose another directory"
        )

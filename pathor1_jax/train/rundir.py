"""A run directory owns its identity and is used by one run at a time.

    run = RunDir(out_dir, stage="sft", config=config)   # checks it is writable, takes the lock
    run.claim(params)     # records or checks stage + architecture, writes run_config.json
    ...
    run.release()

`<run>/run.json` records the stage, the architecture (every parameter's path, shape and dtype, as a
fingerprint, plus the counts) and the config's fingerprint. A run started on a directory whose
`run.json` names another stage or architecture is refused, with how to start fresh or fork; a
changed config of the same stage and architecture (more steps, another learning rate) resumes with
a warning listing the changed keys. `<run>/.lock` holds the owner's PID, host and process start
time, and the owner touches it every `HEARTBEAT_S`: a second run on the directory is refused while
the owner lives. A lock whose process is gone (same host: PID and start time) is taken over with a
warning; so is a lock from another host that nobody touched for `STALE_AFTER_S` (a node that died:
a requeued job on another node resumes by itself); while it is fresh, the message says which file
to delete once that run is known to be dead.

Only process 0 of a multi-process run takes the lock and writes the files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from pathor1_jax.errors import ConfigError, UserError
from pathor1_jax.outputs import check_writable_dir, is_remote
from pathor1_jax.train.defaults import layer_options

log = logging.getLogger(__name__)

IDENTITY = "run.json"
LOCK = ".lock"
RUN_CONFIG = "run_config.json"
HEARTBEAT_S = 60.0  # ours: how often the owner touches its lock
STALE_AFTER_S = 15 * 60.0  # ours: a lock of another host untouched this long is a dead run's


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (field 22 of /proc/<pid>/stat), or None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, start: str | None) -> bool:
    """Whether `pid` runs and is the same process (its start time matches, where known)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    return start is None or _process_start(pid) in (None, start)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as one level of dotted keys (`{"a": {"b": 1}}` -> `{"a.b": 1}`)."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def architecture(params: Any) -> dict[str, Any]:
    """What a checkpoint's parameters must match: a fingerprint of every path, shape and dtype."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    described = sorted(
        (jax.tree_util.keystr(path), tuple(int(d) for d in x.shape), str(np.dtype(x.dtype)))
        for path, x in leaves
    )
    digest = hashlib.sha256(json.dumps(described).encode()).hexdigest()[:16]
    return {
        "fingerprint": digest,
        "num_arrays": len(described),
        "num_params": int(sum(int(np.prod(shape)) for _, shape, _ in described)),
    }


def config_dict(config: ml_collections.ConfigDict | dict) -> dict:
    """The config as plain JSON values (tuples as lists), comparable across runs."""
    plain = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    return json.loads(json.dumps(plain, default=str))


def config_fingerprint(config: ml_collections.ConfigDict | dict) -> str:
    return hashlib.sha256(json.dumps(config_dict(config), sort_keys=True).encode()).hexdigest()[:16]


def check_init_run(
    model: ml_collections.ConfigDict, run_dir: Path, hf_config: Callable[[ml_collections.ConfigDict], dict]
) -> None:
    """`ConfigError` at start-up, naming what differs, when the run in `run_dir` (`init_from`) trained
    another architecture (`hf_config` of a `config.model` block: the model family's HF config dict) or
    layer layout (`scan_layers`) than `model` builds: its checkpoint would not load. Not checked: a
    directory without run_config.json, and a run whose architecture cannot be read any more (its
    `model.path` gone, or a preset this version does not know); the restore reports those."""
    if not (run_dir / RUN_CONFIG).exists():
        return
    run_model = ml_collections.ConfigDict(json.loads((run_dir / RUN_CONFIG).read_text())["model"])
    where = f"config.model.init_from={str(run_dir)!r}"
    mine, theirs = layer_options(model)["scan_layers"], layer_options(run_model)["scan_layers"]
    if mine != theirs:
        raise ConfigError(
            f"{where}: that run's checkpoint has its layers {'stacked' if theirs else 'unrolled'} "
            f"(model.scan_layers={theirs}); set config.model.scan_layers={theirs}"
        )
    try:
        run_arch = flatten(hf_config(run_model))
    except (OSError, ValueError):
        return
    arch = flatten(hf_config(model))
    differ = [f"{k} {run_arch.get(k)!r} there, {arch.get(k)!r} here" for k in changed_keys(run_arch, arch)]
    if differ:
        source = {k: run_model.get(k) for k in ("preset", "path") if run_model.get(k)}
        raise ConfigError(
            f"{where}: that run trained another architecture ({', '.join(differ)}); set config.model "
            f"as that run's ({', '.join(f'{k}={v!r}' for k, v in source.items()) or 'hf_config'})"
        )


def changed_keys(old: dict, new: dict) -> list[str]:
    """Dotted keys whose values differ between two config dicts (added and removed keys too)."""
    a, b = flatten(old), flatten(new)
    return sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))


class RunDir:
    """A run directory: write-tested and locked at construction (process 0), identity on `claim`."""

    def __init__(self, path: str | Path, stage: str, config: ml_collections.ConfigDict | dict | None = None):
        self.path = Path(path)
        self.stage = stage
        self.config = config
        self.main = jax.process_index() == 0
        self._locked = False
        self._stop = threading.Event()
        self._created = not self.path.exists()
        if self.main and not is_remote(self.path):
            check_writable_dir(self.path, "run directory")
            self._lock()

    # -- the lock -------------------------------------------------------------------------------
    def _lock(self) -> None:
        lock = self.path / LOCK
        me = {"pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid())}
        for _ in range(3):
            try:
                fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                owner = _read_lock(lock)
                if owner is None:  # being written right now, or garbage: look once more
                    time.sleep(0.2)
                    owner = _read_lock(lock)
                if owner is not None and all(owner.get(k) == v for k, v in me.items()):
                    self._locked = True  # this process holds it already (a second Trainer)
                    return
                self._refuse_unless_stale(lock, owner, me["host"])
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({**me, "since": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
            self._locked = True
            threading.Thread(target=self._heartbeat, args=(lock,), name="run-dir-lock", daemon=True).start()
            return
        raise UserError(f"run directory {self.path}: cannot take the lock {lock}")

    def _heartbeat(self, lock: Path) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(lock)
            except OSError:  # released, or the disk went away: nothing to keep alive
                return

    def _refuse_unless_stale(self, lock: Path, owner: dict | None, host: str) -> None:
        """Remove the lock of a dead owner; refuse while the owner may live."""
        if owner is None or not isinstance(owner.get("pid"), int):
            log.warning("run directory %s: unreadable lock %s, taking it over", self.path, lock)
        elif owner.get("host") != host:
            try:
                silent = time.time() - lock.stat().st_mtime
            except FileNotFoundError:  # released meanwhile
                return
            if silent < STALE_AFTER_S:
                raise UserError(
                    f"run directory {self.path} is locked by PID {owner['pid']} on host {owner.get('host')} "
                    f"since {owner.get('since')} (alive {silent:.0f} s ago): another run uses it. If that "
                    f"run is dead, delete {lock} (or wait: a lock silent for {STALE_AFTER_S / 60:.0f} min "
                    "is taken over)"
                )
            log.warning(
                "run directory %s: lock of PID %s on host %s silent for %.0f min, taking it over",
                self.path, owner["pid"], owner.get("host"), silent / 60,
            )  # fmt: skip
        elif _alive(owner["pid"], owner.get("start")):
            raise UserError(
                f"run directory {self.path} is in use by PID {owner['pid']} on this host since "
                f"{owner.get('since')}: wait for it, stop it, or choose another directory"
            )
        else:
            log.warning(
                "run directory %s: stale lock of dead PID %s, taking it over", self.path, owner["pid"]
            )
        lock.unlink(missing_ok=True)

    def release(self, abandon: bool = False) -> None:
        """Give the lock up; `abandon`: the run failed at start-up, so a directory this run created
        is removed again if nothing else was written in it."""
        self._stop.set()
        if self._locked:
            (self.path / LOCK).unlink(missing_ok=True)
            self._locked = False
        if abandon and self._created and self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()

    # -- identity -------------------------------------------------------------------------------
    def claim(self, params: Any) -> None:
        """Check this run against `run.json` (refusing another stage or architecture), or record it;
        then write `run_config.json`. Call before restoring a checkpoint."""
        if not self.main or is_remote(self.path):
            return
        arch = architecture(params)
        identity_file = self.path / IDENTITY
        previous = self._read(identity_file)
        config = config_dict(self.config) if self.config is not None else {}
        if previous is not None:
            self._check(previous, arch, config)
        elif (self.path / "checkpoints").is_dir() and any((self.path / "checkpoints").iterdir()):
            log.warning("run directory %s has checkpoints but no %s: adopting it as a %s run", self.path,
                        IDENTITY, self.stage)  # fmt: skip
        identity = {
            "stage": self.stage,
            "architecture": arch,
            "config_fingerprint": config_fingerprint(config),
            "created": (previous or {}).get("created", time.strftime("%Y-%m-%d %H:%M:%S")),
        }
        _write_json(identity_file, identity)
        if self.config is not None:
            text = (
                self.config.to_json_best_effort(indent=2)
                if isinstance(self.config, ml_collections.ConfigDict)
                else json.dumps(config, indent=2)
            )
            _write_text(self.path / RUN_CONFIG, text)

    def _read(self, file: Path) -> dict | None:
        if not file.exists():
            return None
        try:
            return json.loads(file.read_text())
        except ValueError as e:
            raise UserError(f"{file}: unreadable ({e}); move the run directory away to start fresh") from e

    def _check(self, previous: dict, arch: dict, config: dict) -> None:
        how = (
            f"to start fresh, use another directory (--workdir or config.train.out_dir) or delete "
            f"{self.path}; to start from its weights, use a new directory with "
            f"--config.model.init_from={self.path}"
        )
        if previous.get("stage") != self.stage:
            raise UserError(
                f"run directory {self.path} holds a {previous.get('stage')!r} run; this is a "
                f"{self.stage!r} run: {how}"
            )
        old_config = self._read(self.path / RUN_CONFIG) or {}
        changed = changed_keys(old_config, config) if old_config else ["(previous config unknown)"]
        old_arch = previous.get("architecture", {})
        if old_arch.get("fingerprint") != arch["fingerprint"]:
            model_keys = [k for k in changed if k.startswith("model.")]  # e.g. model.scan_layers
            because = f" (model keys changed since: {', '.join(model_keys)})" if model_keys else ""
            raise UserError(
                f"run directory {self.path} holds a model with {old_arch.get('num_params')} parameters in "
                f"{old_arch.get('num_arrays')} arrays (architecture {old_arch.get('fingerprint')}); this "
                f"config builds {arch['num_params']} in {arch['num_arrays']} ({arch['fingerprint']})"
                f"{because}: {how}"
            )
        if previous.get("config_fingerprint") != config_fingerprint(config):
            log.warning("run directory %s: resuming with a changed config: %s", self.path, ", ".join(changed))


def _read_lock(lock: Path) -> dict | None:
    try:
        owner = json.loads(lock.read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    _write_text(path, json.dumps(obj, indent=2))

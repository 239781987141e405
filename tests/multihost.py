"""Multi-process jobs on this machine for the tests: `launch/local.sh`'s launcher running
`pathor1 train` (or a test driver) in N processes with D fake CPU devices each.

Every job is bounded twice: by the launcher's `--timeout` (it stops its processes, exit 124) and by
`Job.wait`'s own deadline a little later (SIGTERM, then SIGKILL, to the launcher and its process
groups), so a hang fails the test instead of blocking CI.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

REPO = Path(__file__).resolve().parents[1]
CLIP = [
    "--config", str(REPO / "configs/pathoclip_tiny.py"), "--config.optim.warmup_steps=1",
    "--config.data.shards=2", "--config.data.batch_size=4", "--config.train.keep=100",
]  # fmt: skip


class Job:
    """One launcher run; its output is collected line by line (`lines`), pids of its processes too."""

    def __init__(self, num_processes: int, devices: int, command: list[str], *, timeout: float,
                 heartbeat_s: int = 60, wait_for_others: bool = False, env: dict | None = None):  # fmt: skip
        self.timeout = timeout
        launcher = [sys.executable, "-m", "pathor1_jax.launch.local", str(num_processes), str(devices),
                    "--timeout", str(timeout), "--grace", "20",
                    "--heartbeat-timeout", str(heartbeat_s)]  # fmt: skip
        if wait_for_others:
            launcher.append("--wait-for-others")
        self.proc = subprocess.Popen(
            [*launcher, "--", *command],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={
                **os.environ,
                "JAX_PLATFORMS": "cpu",
                **(env or {}),
            },
            cwd=REPO,
        )
        self.lines: list[str] = []
        self.pids: dict[int, int] = {}
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if m := re.match(r"\[local\] p(\d+) pid (\d+)", line):
                self.pids[int(m.group(1))] = int(m.group(2))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def signal(self, process: int, signum: int) -> None:
        os.kill(self.pids[process], signum)

    def wait(self) -> int:
        try:
            rc = self.proc.wait(timeout=self.timeout + 60)
        except subprocess.TimeoutExpired as e:
            self.stop()
            late = f"job still running after {self.timeout + 60} s:\n{self.output[-5000:]}"
            raise AssertionError(late) from e
        self._reader.join(timeout=10)
        return rc

    def stop(self) -> None:
        """End the job if it still runs: SIGTERM to the launcher (it stops its processes), SIGKILL
        to everything 30 s later."""
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            for pid in self.pids.values():
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.kill()


def train(num_processes: int, devices: int, workdir: Path, *args: str, timeout: float = 600, **kw) -> Job:
    """`pathor1 train --workdir workdir ARGS` in a local multi-process job (started, not awaited)."""
    command = [sys.executable, "-m", "pathor1_jax.cli", "train", "--workdir", str(workdir), *args]
    return Job(num_processes, devices, command, timeout=timeout, **kw)


def run_ok(job: Job) -> Job:
    rc = job.wait()
    assert rc == 0, f"exit {rc}:\n{job.output[-8000:]}"
    return job


def run_all_ok(*jobs: Job) -> None:
    """`run_ok` for jobs started together; when one fails, the others are stopped."""
    try:
        for job in jobs:
            run_ok(job)
    finally:
        for job in jobs:
            job.stop()


def metrics(run: Path) -> dict[int, dict]:
    """`{step: metrics}` of a run's metrics.jsonl."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


def losses(run: Path) -> dict[int, float]:
    """`{step: loss}` of a run's metrics.jsonl."""
    return {step: r["loss"] for step, r in metrics(run).items()}


def wait_for(predicate, timeout: float, what: str, job: Job | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if job is not None and job.proc.poll() is not None:
            raise AssertionError(f"the job ended before {what}:\n{job.output[-5000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {timeout} s" + (f":\n{job.output[-5000:]}" if job else ""))
        time.sleep(0.02)


def complete_steps(run: Path) -> list[int]:
    """Committed checkpoint steps (orbax renames a save's temporary folder when it is complete)."""
    folder = run / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def checkpoint_state(run: Path, step: int) -> dict:
    """The train state of a checkpoint as numpy arrays (whatever process layout wrote it)."""
    path = run / "checkpoints" / str(step) / "state"
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(path).item_metadata.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(path, restore_args=args)


def assert_close_trees(a, b, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    """Parameters equal up to float rounding. The absolute tolerance is for gradients that are zero in
    exact arithmetic (e.g. of a key bias, which softmax ignores): AdamW turns their rounding noise
    into updates of a few 1e-6 that differ with the reduction order of another layout."""
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))

"""Shipped configs compiled for their TPU slices by `pathor1 compile`, each cell in its own process.

    pool = start([("grpo_3b.py", "v5e-16"), ...], workers=2)   # returns at once
    cell = pool.result("grpo_3b.py", "v5e-16")                   # waits for that compile
    cell.report["fits"], cell.kernels["token_logprobs_fwd"]

A cell is the user's command, `pathor1 compile --config configs/<config> --topology <slice> --json`,
run from the repository root: its exit code, its JSON report and the Mosaic kernels its text report
lists. A compile takes minutes and 2-7 GiB, and libtpu's code generation is mostly one thread: a
process per cell gives the memory back, and `workers` processes at a time use the other core while a
test waits. Cells start in the order given (put the longest first); `start` is idempotent per cell.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 3600  # one cell; a compile here takes 3-10 minutes of wall under load
_KERNELS = re.compile(r"^Mosaic kernels \(tpu_custom_call\): (.*)$", re.M)


@dataclasses.dataclass(frozen=True)
class Cell:
    """One finished `pathor1 compile` process."""

    config: str
    topology: str
    returncode: int
    stdout: str
    stderr: str
    report: dict | None  # the --json report (None when the process wrote none)
    cpu_seconds: float  # user + system CPU of the process (its cost whatever else runs)
    max_rss_gib: float  # the process's peak resident memory

    @property
    def kernels(self) -> dict[str, int]:
        """Mosaic kernels of the compiled step (the text report's line): name → custom calls."""
        found = _KERNELS.search(self.stdout)
        if found is None or found.group(1) == "none":
            return {}
        return {name: int(n) for name, n in (k.rsplit(" x", 1) for k in found.group(1).split(", "))}

    def describe(self) -> str:
        """What went wrong, for an assertion message: the exit code and the last lines of stderr."""
        tail = "\n".join(self.stderr.strip().splitlines()[-5:])
        return f"{self.config} on {self.topology}: exit {self.returncode}\n{self.stdout[-2000:]}\n{tail}"


class Pool:
    def __init__(self, workers: int, nice: int):
        self.nice = nice
        self.out = Path(tempfile.mkdtemp(prefix="pathor1-fit-"))
        self.todo: queue.Queue = queue.Queue()
        self.done: dict[tuple[str, str], threading.Event] = {}
        self.cells: dict[tuple[str, str], Cell] = {}
        self.running: set[subprocess.Popen] = set()
        self.stopped = False
        for _ in range(workers):
            threading.Thread(target=self._work, daemon=True).start()
        atexit.register(self.stop)

    def add(self, config: str, topology: str) -> None:
        key = (config, topology)
        if key not in self.done:
            self.done[key] = threading.Event()
            self.todo.put(key)

    def result(self, config: str, topology: str) -> Cell:
        key = (config, topology)
        self.add(*key)
        if not self.done[key].wait(TIMEOUT_S + 60):
            raise TimeoutError(f"pathor1 compile of {config} for {topology} did not finish")
        return self.cells[key]

    def stop(self) -> None:
        self.stopped = True  # no new process after this
        for proc in list(self.running):
            proc.kill()
        shutil.rmtree(self.out, ignore_errors=True)

    def _work(self) -> None:
        while True:
            key = self.todo.get()
            try:
                self.cells[key] = self._compile(*key)
            except Exception as e:  # a failure to start the process: the test reports it
                self.cells[key] = Cell(*key, -1, "", repr(e), None, 0.0, 0.0)
            finally:
                self.done[key].set()

    def _compile(self, config: str, topology: str) -> Cell:
        stem = self.out / f"{Path(config).stem}@{topology}"
        out, log, err = (stem.with_suffix(suffix) for suffix in (".json", ".out", ".err"))
        cmd = ["nice", "-n", str(self.nice), sys.executable, "-m", "pathor1_jax.cli", "compile",
               "--config", f"configs/{config}", "--topology", topology, "--json", str(out)]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self.stopped:
            raise RuntimeError("the pool was stopped")
        with open(log, "w") as stdout, open(err, "w") as stderr:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=stdout, stderr=stderr)
        self.running.add(proc)
        timer = threading.Timer(TIMEOUT_S, proc.kill)
        timer.start()
        try:  # wait4, not proc.wait(): the child's own CPU time, even with other cells running
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        finally:
            timer.cancel()
            self.running.discard(proc)
        report = json.loads(out.read_text()) if out.exists() else None
        cpu, rss = usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 2**20  # ru_maxrss: KiB
        return Cell(config, topology, proc.returncode, log.read_text(), err.read_text(), report, cpu, rss)


_POOL: Pool | None = None


def start(cells: list[tuple[str, str]], workers: int = 2, nice: int = 10) -> Pool:
    """The process-wide pool (made on the first call, with its `workers` and `nice`), with `cells`
    queued in order unless already queued."""
    global _POOL
    if _POOL is None:
        _POOL = Pool(workers, nice)
    for cell in cells:
        _POOL.add(*cell)
    return _POOL

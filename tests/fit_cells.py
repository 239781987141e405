"""Shipped configs compiled for their TPU slices by `pathor1 compile`, each cell in its own process.

    pool = start([("grpo_3b.py", "v5e-16"), ...], workers=1, nice=19)   # returns at once
    cell = pool.result("grpo_3b.py", "v5e-16")                   # waits for that compile
    cell.report["fits"], cell.kernels["token_logprobs_fwd"]

A cell is the user's command, `pathor1 compile --config configs/<config> --topology <slice> --json`,
run from the repository root: its exit code, its JSON report and the Mosaic kernels its text report
lists. A compile takes minutes and 2-7 GiB, and libtpu's code generation is mostly one thread: a
process per cell gives the memory back, and `workers` processes at a time use a core the other tests
leave idle (tests/conftest.py starts the suite's cells at collection: one at a time at nice 19; a later
`start` with more workers adds them). Cells start in the order given (put the longest first); `start`
is idempotent per cell.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import queue
import re
import shutil
import tempfile
import threading
from pathlib import Path

from pathor1_jax.launch.compile import Compiled, CompileProcess

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 3600  # one cell; a compile here takes 3-10 minutes of wall under load
_KERNELS = re.compile(r"^Mosaic kernels \(tpu_custom_call\): (.*)$", re.M)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Cell(Compiled):
    """One finished `pathor1 compile` process: how it went, and which cell it was."""

    config: str
    topology: str

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
        # the environment as the pool starts (collection): a cell started later must not inherit what
        # a running test set for itself, e.g. monkeypatch's PATHOR1_PALLAS_INTERPRET=1, under which
        # the policy loss compiles interpreted, without its Mosaic kernels
        self.env = dict(os.environ)
        self.out = Path(tempfile.mkdtemp(prefix="pathor1-fit-"))
        self.todo: queue.Queue = queue.Queue()
        self.done: dict[tuple[str, str], threading.Event] = {}
        self.cells: dict[tuple[str, str], Cell] = {}
        self.running: set[CompileProcess] = set()
        self.stopped = False
        self.workers = 0
        self.grow(workers)
        atexit.register(self.stop)

    def grow(self, workers: int) -> None:
        """At least `workers` processes at a time from now on."""
        for _ in range(workers - self.workers):
            threading.Thread(target=self._work, daemon=True).start()
        self.workers = max(self.workers, workers)

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
                self.cells[key] = Cell(-1, "", repr(e), None, 0.0, 0.0, config=key[0], topology=key[1])
            finally:
                self.done[key].set()

    def _compile(self, config: str, topology: str) -> Cell:
        if self.stopped:
            raise RuntimeError("the pool was stopped")
        out = self.out / f"{Path(config).stem}@{topology}.json"
        proc = CompileProcess(config, topology, out, nice=self.nice, cwd=ROOT, env=self.env)
        self.running.add(proc)
        try:
            done = proc.wait(TIMEOUT_S)
        finally:
            self.running.discard(proc)
        return Cell(**dataclasses.asdict(done), config=config, topology=topology)


_POOL: Pool | None = None


def start(cells: list[tuple[str, str]], workers: int = 2, nice: int = 10) -> Pool:
    """The process-wide pool (made on the first call, with its `nice`), with `cells` queued in order
    unless already queued and at least `workers` processes at a time."""
    global _POOL
    if _POOL is None:
        _POOL = Pool(workers, nice)
    _POOL.grow(workers)
    for cell in cells:
        _POOL.add(*cell)
    return _POOL

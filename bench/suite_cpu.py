"""The test suite's CPU seconds per test file: a pytest plugin that adds each test's CPU time (user +
sys of pytest and of the subprocesses it waited for, set-up and tear-down included) to its file,
then prints a table and writes it as JSON. CPU seconds, not wall: this machine is shared.

    PYTHONPATH=. pytest -q -p bench.suite_cpu tests/test_x.py [--suite-cpu-json out.json]

On an idle 2-core machine a file's wall time is at most its CPU time (XLA and Eigen use both cores
at times), so the table's sum bounds the idle suite time from above, collection aside.
"""

from __future__ import annotations

import json
import resource
import time
from collections import defaultdict

import pytest


def _cpu() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class SuiteCPU:
    def __init__(self, out: str | None):
        self.out = out
        self.start_cpu, self.start_wall = _cpu(), time.monotonic()
        self.collect_cpu = 0.0
        self.cpu: dict[str, float] = defaultdict(float)
        self.wall: dict[str, float] = defaultdict(float)
        self.tests: dict[str, int] = defaultdict(int)

    @pytest.hookimpl(trylast=True)
    def pytest_collection_finish(self, session):
        self.collect_cpu = _cpu() - self.start_cpu

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        cpu, wall = _cpu(), time.monotonic()
        yield
        path = item.nodeid.split("::")[0]
        self.cpu[path] += _cpu() - cpu
        self.wall[path] += time.monotonic() - wall
        self.tests[path] += 1

    def pytest_terminal_summary(self, terminalreporter):
        rows = sorted(self.cpu, key=self.cpu.get, reverse=True)
        total = sum(self.cpu.values())
        tr = terminalreporter
        tr.section("CPU seconds per test file (user+sys, subprocesses included)")
        tr.write_line(f"{'file':<46} {'tests':>5} {'CPU-s':>8} {'wall-s':>8}")
        for path in rows:
            tr.write_line(f"{path:<46} {self.tests[path]:>5} {self.cpu[path]:>8.1f} {self.wall[path]:>8.1f}")
        tr.write_line(f"{'collection':<46} {'':>5} {self.collect_cpu:>8.1f}")
        tr.write_line(f"{'total':<46} {sum(self.tests.values()):>5} {total + self.collect_cpu:>8.1f} "
                      f"{time.monotonic() - self.start_wall:>8.1f}")  # fmt: skip
        if self.out:
            with open(self.out, "w") as f:
                json.dump({"collection_cpu_s": self.collect_cpu,
                           "files": {p: {"tests": self.tests[p], "cpu_s": self.cpu[p], "wall_s": self.wall[p]}
                                     for p in rows}}, f, indent=1)  # fmt: skip


def pytest_addoption(parser):
    parser.addoption("--suite-cpu-json", default=None, help="write the per-file CPU table here (JSON)")


def pytest_configure(config):
    config.pluginmanager.register(SuiteCPU(config.getoption("--suite-cpu-json")), "suite_cpu")

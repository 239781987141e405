"""`pathor1 compile` of one config for one TPU slice in a child process, with what the child cost: a
TPU compile takes minutes and 2-7 GiB here, a process per compile gives the memory back, and the
child's own resource usage (`os.wait4`) is its cost whatever else runs on the host.

    proc = CompileProcess("sft_3b.py", "v5e-16", Path("out/sft_3b@v5e-16.json"), cwd=repo_root)
    done = proc.wait()   # a `Compiled`: exit code, output, the --json report, CPU seconds, peak RSS

`bench/fit_table.py` (the README's fit table) and the tests' fit cells (`tests/fit_cells.py`) run
their cells with it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Compiled:
    """A finished `pathor1 compile` process."""

    returncode: int
    stdout: str
    stderr: str
    report: dict | None  # the --json report (None when the process wrote none)
    cpu_seconds: float  # user + system CPU of the process
    max_rss_gib: float  # its peak resident memory


class CompileProcess:
    """`nice -n <nice> python -m pathor1_jax.cli compile --config configs/<config> --topology
    <topology> --json <json_path> [args]`, started at once, from `cwd` (a checkout's root: the config
    is read from its `configs/`), in `env` (default: this process's environment now)."""

    def __init__(
        self,
        config: str,
        topology: str,
        json_path: Path,
        args: Sequence[str] = (),
        *,
        nice: int = 10,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
    ):
        self.json_path = json_path
        flags = ["--config", f"configs/{config}", "--topology", topology, "--json", str(json_path), *args]
        cmd = ["nice", "-n", str(nice), sys.executable, "-m", "pathor1_jax.cli", "compile", *flags]
        # the output goes to files, not pipes: a full pipe would stall the child, and reading pipes
        # to the end would reap it before `wait4` gets its resource usage
        self._out, self._err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}
        self.popen = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=self._out, stderr=self._err)

    def kill(self) -> None:
        self.popen.kill()

    def wait(self, timeout_s: float | None = None) -> Compiled:
        """The finished process (killed after `timeout_s` seconds, if given)."""
        timer = threading.Timer(timeout_s, self.kill) if timeout_s is not None else None
        if timer is not None:
            timer.start()
        try:  # wait4, not Popen.wait(): the child's own usage, even with other children running
            _, status, usage = os.wait4(self.popen.pid, 0)
            self.popen.returncode = os.waitstatus_to_exitcode(status)
        finally:
            if timer is not None:
                timer.cancel()
        output = []
        for file in (self._out, self._err):
            file.seek(0)
            output.append(file.read())
            file.close()
        report = json.loads(self.json_path.read_text()) if self.json_path.exists() else None
        cpu, rss = usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 2**20  # ru_maxrss: KiB
        return Compiled(self.popen.returncode, *output, report, cpu, rss)

"""Run a Python snippet in a subprocess that sees 8 fake CPU devices.

`NPROC=16` avoids a collective deadlock of XLA's CPU runtime on 2-core machines; it is set only
for these subprocesses because it slows single-device runs.

The time limit bounds a hang, not the speed: the 8 devices' threads meet at every collective, and on
a loaded host a descheduled one keeps the others waiting (tests/test_sharding_multidevice.py's Qwen
snippet: 49 s idle, 150 s at a load of 7 on 2 cores, over 500 s busier still). A snippet that runs
out of time fails with what it printed so far.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

TIMEOUT_S = 1800


def run_on_8_devices(code: str, timeout: int = TIMEOUT_S) -> str:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env["NPROC"] = "16"
    env["JAX_PLATFORMS"] = "cpu"
    try:
        proc = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:  # its output so far is bytes, whatever `text` says
        printed = b"".join(x or b"" for x in (e.stdout, e.stderr)).decode(errors="replace")
        raise AssertionError(f"8-device subprocess still running after {timeout} s:\n{printed}") from e
    if proc.returncode != 0:
        raise AssertionError(f"8-device subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout

"""Run a Python snippet in a subprocess that sees 8 fake CPU devices.

`NPROC=16` avoids a collective deadlock of XLA's CPU runtime on 2-core machines; it is set only
for these subprocesses because it slows single-device runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap


def run_on_8_devices(code: str, timeout: int = 600) -> str:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env["NPROC"] = "16"
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(f"8-device subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout

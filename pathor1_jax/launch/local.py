"""A multi-host job on one machine: N copies of a command, each a JAX process with its own fake CPU
devices, joined by `jax.distributed` (coordinator on 127.0.0.1) and gloo collectives.

    python -m pathor1_jax.launch.local 2 2 -- pathor1 train --config configs/demo_sft.py
    launch/local.sh 2 2 -- pathor1 train --config configs/demo_sft.py        # the same

Process i gets the variables `maybe_initialize_distributed` reads (those launch/gpu.sh sets):
`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`, plus `JAX_PLATFORMS=cpu` and
`--xla_force_host_platform_device_count=D` in `XLA_FLAGS`. Every line a process prints comes out
here prefixed with `[pI]`. The first process to fail (non-zero exit or killed) ends the job: the
others get SIGTERM (a pathor1 run then checkpoints and exits), then SIGKILL after `--grace`
seconds; the job's exit code is the failing process's (128 + signal when killed). A process that
exits 143 (`errors.EXIT_PREEMPTED`: it saved a checkpoint together with the others) is not a
failure to stop the others for: they get `--grace` seconds to finish the same checkpoint, and the
job exits 143, "rerun me to resume". The whole job is bounded by `--timeout` (exit 124). SIGTERM
or Ctrl-C to this launcher is passed on to every process, as a scheduler preempting the whole job
would.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from pathor1_jax.errors import EXIT_PREEMPTED
from pathor1_jax.sharding.env import (
    COORDINATOR_ENV,
    HEARTBEAT_ENV,
    NUM_PROCESSES_ENV,
    PROCESS_ID_ENV,
)

TIMEOUT_EXIT = 124
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def free_port() -> int:
    """A TCP port nothing listens on now (the coordinator binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(
    base: dict[str, str], process_id: int, num_processes: int, devices: int, port: int, heartbeat_s: int
) -> dict[str, str]:
    """The environment of process `process_id`: cluster variables, CPU platform, fake devices."""
    flags = re.sub(rf"{DEVICE_COUNT_FLAG}=\S+", "", base.get("XLA_FLAGS", "")).split()
    return {
        **base,
        COORDINATOR_ENV: f"127.0.0.1:{port}",
        NUM_PROCESSES_ENV: str(num_processes),
        PROCESS_ID_ENV: str(process_id),
        HEARTBEAT_ENV: str(heartbeat_s),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": " ".join([*flags, f"{DEVICE_COUNT_FLAG}={devices}"]),
        "PYTHONUNBUFFERED": "1",
    }


def exit_code(returncode: int) -> int:
    """A child's return code as a shell reports it (128 + N when killed by signal N)."""
    return 128 - returncode if returncode < 0 else returncode


class Job:
    """The N processes of one local multi-host run."""

    def __init__(self, command: Sequence[str], num_processes: int, devices: int, *, port: int,
                 heartbeat_s: int, grace_s: float, wait_for_others: bool = False,
                 out=sys.stdout):  # fmt: skip
        self.out = out
        self.grace_s = grace_s
        self.wait_for_others = wait_for_others
        self._lock = threading.Lock()
        self.procs: list[subprocess.Popen] = []
        for i in range(num_processes):
            env = process_env(dict(os.environ), i, num_processes, devices, port, heartbeat_s)
            proc = subprocess.Popen(
                list(command),
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: stopping it stops its children too
            )
            self.procs.append(proc)
            self.say(f"p{i} pid {proc.pid}")
        self.readers = [
            threading.Thread(target=self._stream, args=(i, p), daemon=True) for i, p in enumerate(self.procs)
        ]
        for reader in self.readers:
            reader.start()

    def say(self, message: str, prefix: str = "[local]") -> None:
        with self._lock:
            self.out.write(f"{prefix} {message}\n")
            self.out.flush()

    def _stream(self, i: int, proc: subprocess.Popen) -> None:
        for raw in iter(proc.stdout.readline, b""):
            self.say(raw.decode(errors="replace").rstrip("\n"), prefix=f"[p{i}]")

    def signal_all(self, signum: int) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signum)
                except ProcessLookupError:
                    pass

    def stop(self) -> None:
        """SIGTERM to the running processes, SIGKILL to those still running after the grace period."""
        self.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
            time.sleep(0.05)
        if any(p.poll() is None for p in self.procs):
            self.say(f"still running {self.grace_s:g} s after SIGTERM: SIGKILL")
            self.signal_all(signal.SIGKILL)
        for proc in self.procs:
            proc.wait()
        for reader in self.readers:
            reader.join(timeout=5)

    def wait(self, timeout_s: float) -> int:
        """Run to the end: 0 when every process exits 0, else the first failure's code."""
        deadline = time.monotonic() + timeout_s
        preempted_at = None
        while True:
            codes = [p.poll() for p in self.procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            preempted = [i for i, c in failed if exit_code(c) == EXIT_PREEMPTED]
            if preempted and len(preempted) == len(failed) and not self.wait_for_others:
                # a preempted pathor1 process has saved the checkpoint with the others (they agree
                # on the step): let them finish it rather than stop them mid-save
                preempted_at = preempted_at or time.monotonic()
                if time.monotonic() - preempted_at > self.grace_s:
                    self.say(f"p{preempted[0]} was preempted {self.grace_s:g} s ago; stopping the others")
                    self.stop()
                    return EXIT_PREEMPTED
            elif failed and not self.wait_for_others:
                i, code = failed[0]
                self.say(f"p{i} exited with {exit_code(code)}; stopping the others")
                self.stop()
                return exit_code(code)
            if all(c is not None for c in codes):
                for i, code in failed:
                    self.say(f"p{i} exited with {exit_code(code)}")
                for reader in self.readers:
                    reader.join(timeout=5)
                return exit_code(failed[0][1]) if failed else 0
            if time.monotonic() > deadline:
                self.say(f"timeout: still running after {timeout_s:g} s; stopping all processes")
                self.stop()
                return TIMEOUT_EXIT
            time.sleep(0.05)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "%(prog)s N_PROCESSES DEVICES_PER_PROCESS [options] -- COMMAND ..."
    if "--" not in argv:
        print("usage: " + usage % {"prog": "launch/local.sh"}, file=sys.stderr)
        return 2
    split = argv.index("--")
    command = argv[split + 1 :]
    parser = argparse.ArgumentParser(prog="launch/local.sh", description=__doc__.splitlines()[0], usage=usage)
    parser.add_argument("num_processes", type=int)
    parser.add_argument("devices", type=int, help="fake CPU devices per process")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds for the whole job (exit 124)")
    parser.add_argument("--grace", type=float, default=30.0, help="seconds between SIGTERM and SIGKILL")
    parser.add_argument("--port", type=int, default=0, help="coordinator port (default: a free one)")
    parser.add_argument("--heartbeat-timeout", type=int, default=60,
                        help="seconds without a heartbeat before a process counts as dead")  # fmt: skip
    parser.add_argument("--wait-for-others", action="store_true",
                        help="when a process fails, let the others notice it themselves")  # fmt: skip
    args = parser.parse_args(argv[:split])
    if args.num_processes < 1 or args.devices < 1:
        parser.error("N_PROCESSES and DEVICES_PER_PROCESS must be >= 1")
    if not command:
        parser.error("no command after --")
    job = Job(command, args.num_processes, args.devices, port=args.port or free_port(),
              heartbeat_s=args.heartbeat_timeout, grace_s=args.grace,
              wait_for_others=args.wait_for_others)  # fmt: skip

    def forward(signum, frame):
        job.say(f"received signal {signum}: passing it to every process")
        job.signal_all(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    return job.wait(args.timeout)


if __name__ == "__main__":
    sys.exit(main())

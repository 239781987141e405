"""Many hosts on one machine (`launch/local.sh`): SFT step time by process layout, and how long a
survivor takes to notice that a peer process was killed.

1. The same SFT run (tiny Qwen2.5-VL with images, demo chats, 4 data shards = one global batch) on
   1 process × 4 devices, 2 × 2 and 4 × 1 fake CPU devices; the step time is the median of the
   steps after the first two (the first compiles). Same global batch, same losses: the layouts
   differ only in how many processes the collectives cross (gloo over TCP between processes).
2. A 2 × 2 run; once it is stepping, process 1 gets SIGKILL; the time until process 0 has stopped
   by itself (`--wait-for-others`), with its error line.

Usage: python bench/multihost.py [--steps 8] [--layouts 1x4,2x2,4x1] [--heartbeat 60]
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SFT = [
    "--config", str(ROOT / "configs/demo_sft.py"), "--config.model.init_from=",
    "--config.optim.warmup_steps=1", "--config.data.shards=4", "--config.data.batch_size=1",
    "--config.train.ckpt_every=1000",
]  # fmt: skip


def launch(layout: str, workdir: Path, steps: int, heartbeat: int, wait_for_others: bool = False):
    n, d = layout.split("x")
    cmd = [sys.executable, "-m", "pathor1_jax.launch.local", n, d, "--timeout", "3600",
           "--heartbeat-timeout", str(heartbeat)]  # fmt: skip
    if wait_for_others:
        cmd.append("--wait-for-others")
    cmd += ["--", sys.executable, "-m", "pathor1_jax.cli", "train", "--workdir", str(workdir), *SFT,
            f"--config.train.steps={steps}"]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)


def metrics(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def step_times(layout: str, steps: int, heartbeat: int) -> tuple[float, float, list[float]]:
    with tempfile.TemporaryDirectory() as tmp:
        proc = launch(layout, Path(tmp), steps, heartbeat)
        out, _ = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"{layout}: exit {proc.returncode}\n{out[-3000:]}")
        rows = metrics(Path(tmp))
    times = [r["step_time_s"] for r in rows]
    return statistics.median(times[2:]), times[0], [r["loss"] for r in rows]


def time_to_notice(heartbeat: int) -> tuple[float, str]:
    with tempfile.TemporaryDirectory() as tmp:
        proc = launch("2x2", Path(tmp), 1000, heartbeat, wait_for_others=True)
        lines: list[str] = []
        pid = None
        while pid is None:
            line = proc.stdout.readline()
            lines.append(line)
            if m := re.match(r"\[local\] p1 pid (\d+)", line):
                pid = int(m.group(1))
        while len(metrics(Path(tmp))) < 3:
            if proc.poll() is not None:
                raise SystemExit("".join(lines) + proc.stdout.read())
            time.sleep(0.05)
        subprocess.run(["kill", f"-{signal.SIGKILL}", str(pid)], check=True)
        killed = time.monotonic()
        rest, _ = proc.communicate()
        noticed = time.monotonic() - killed
    errors = [line for line in rest.splitlines() if "[p0]" in line and "error" in line]
    error = errors[0] if errors else "(no error line)"
    return noticed, error.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--layouts", default="1x4,2x2,4x1")
    parser.add_argument("--heartbeat", type=int, default=60, help="launch/local.sh --heartbeat-timeout")
    args = parser.parse_args()
    print("| processes × devices | step time (median, s) | first step incl. compile (s) | losses |")
    print("|---|---|---|---|")
    for layout in args.layouts.split(","):
        median, first, losses = step_times(layout, args.steps, args.heartbeat)
        shown = ", ".join(f"{x:.6f}" for x in losses[:3])
        print(f"| {layout.replace('x', ' × ')} | {median:.2f} | {first:.1f} | {shown}, … |", flush=True)
    noticed, error = time_to_notice(args.heartbeat)
    print(f"\nSIGKILL of process 1 of 2 while stepping: process 0 stopped {noticed:.1f} s later: {error}")


if __name__ == "__main__":
    main()

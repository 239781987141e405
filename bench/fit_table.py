"""The README's fit table: every shipped config compiled by `pathor1 compile` for each TPU slice.

Each (config, topology) cell is one `pathor1 compile --json` in its own process (a TPU compile takes
minutes and 2–7 GiB here; a process per cell gives the memory back), niced, one at a time. Cells run
in priority order — each config on the slice it is written for first, then the largest SFT 3B batch
on v5e-16 (`--max-batch`), then the other slices — and every finished cell is kept in `--out`
(`<config>@<topology>.json` / `.txt`), so a rerun resumes where the last one stopped and the table
can be printed at any time from what has finished. Each cell's JSON also records the CPU seconds its
process used (`cpu_seconds`: user + sys, the compile's cost whatever the load; wall time is not):

    nohup python bench/fit_table.py --out runs/fit_table &     # unattended; hours on a loaded host
    python bench/fit_table.py --out runs/fit_table --print     # the markdown table so far
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from pathor1_jax.launch.compile import CompileProcess

GIB = 2**30
STATED = {  # each shipped config and the slice it is written for
    "cpt_3b.py": "v5e-16",
    "sft_3b.py": "v5e-16",
    "grpo_3b.py": "v5e-16",
    "dapo_3b.py": "v5e-16",
    "pathoclip_b16.py": "v5e-16",
    "pathoclip_l14.py": "v5e-16",
    "cpt_7b.py": "v5p-64",
    "sft_7b.py": "v5p-64",
    "grpo_7b.py": "v5p-64",
    "dapo_7b.py": "v5p-64",
}
TOPOLOGIES = ("v5e-16", "v5p-8", "v5p-64", "v6e-8")
MAX_BATCH = ("sft_3b.py", "v5e-16")


def cells() -> list[tuple[str, str, bool]]:
    """`(config, topology, max_batch)` in the order they run."""
    stated = [(c, t, False) for c, t in STATED.items()]
    others = [(c, t, False) for c in STATED for t in TOPOLOGIES if t != STATED[c]]
    return [*stated, (*MAX_BATCH, True), *others]


def stem(config: str, topology: str, max_batch: bool) -> str:
    return f"{Path(config).stem}@{topology}" + ("+max-batch" if max_batch else "")


def run_cell(config: str, topology: str, max_batch: bool, out: Path) -> None:
    name = stem(config, topology, max_batch)
    path = out / f"{name}.json"
    start = time.perf_counter()
    print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
    done = CompileProcess(config, topology, path, ["--max-batch"] if max_batch else []).wait()
    log = done.stdout + "\n--- stderr\n" + done.stderr + f"\n--- exit {done.returncode}\n"
    (out / f"{name}.txt").write_text(log)
    last = (done.stderr.strip().splitlines() or [""])[-1]
    report = done.report
    if done.returncode not in (0, 1):  # no report: bad input or a crash
        report = {"error": last, "exit": done.returncode}
    if report is not None:
        report = {**report, "cpu_seconds": round(done.cpu_seconds, 1)}
        path.write_text(json.dumps(report, indent=2) + "\n")
    wall = time.perf_counter() - start
    print(f"  exit {done.returncode} in {wall:.0f} s ({done.cpu_seconds:.0f} CPU-s) {last[:160]}", flush=True)


def row(config: str, topology: str, out: Path) -> str | None:
    path = out / f"{stem(config, topology, False)}.json"
    if not path.exists():
        return None
    report = json.loads(path.read_text())
    if "error" in report:
        return f"| {config} | {topology} | – | error: {report['error']} | | | | |"
    total = report["per_device_bytes"]["total"] / GIB
    cpu = f"{report['cpu_seconds']:.0f}" if "cpu_seconds" in report else "–"
    fits = "yes" if report["fits"] else "**no**"
    chip_flops = {"v5e": 197e12, "v5p": 459e12, "v6e": 918e12, "v4": 275e12}[topology.split("-")[0]]
    ideal = report["flops_per_step"] / (report["devices"] * chip_flops)
    hbm = report["hbm_bytes"] / GIB
    return (
        f"| {config} | {topology} | {total:.2f} / {hbm:.2f} | {fits} | {report['flops_per_step']:.2e} | "
        f"{ideal:.2f} | {report['attention']}, {report['policy_loss'] or '-'} | {cpu} |"
    )


def table(out: Path) -> str:
    lines = [
        "| config | slice | GiB per device (total / usable HBM) | fits | FLOPs per step | ideal step (s) "
        "| attention, policy loss | compile CPU-s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [r for c in STATED for t in TOPOLOGIES if (r := row(c, t, out)) is not None]
    text = out / f"{stem(*MAX_BATCH, True)}.txt"
    if text.exists():
        found = re.search(r"largest batch that fits: (.*)", text.read_text())
        lines.append("")
        lines.append(
            f"Largest batch for {MAX_BATCH[0]} on {MAX_BATCH[1]}: "
            + (found.group(1) if found else "none fits (see the log)")
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/fit_table", help="where each cell's JSON and log go")
    parser.add_argument("--print", action="store_true", help="only print the table of finished cells")
    parser.add_argument("--only", default="", help="run only cells whose name matches this regex")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.print:
        for cell in cells():
            name = stem(*cell)
            if (out / f"{name}.txt").exists() or not re.search(args.only, name):
                continue
            run_cell(*cell, out)
            (out / "table.md").write_text(table(out) + "\n")
    print(table(out))


if __name__ == "__main__":
    main()

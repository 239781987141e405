"""`pathor1 demo`: Patho-R1's stages end to end on the embedded pathology data, on CPU, in minutes.

The demo walks the stages of `pathor1_jax.stages.STAGES` that have a demo part, in order: data
curation on a generated textbook (pairs found against its truth), a tiny random-init Qwen2.5-VL
goes CPT → SFT → GRPO / DAPO (each from the SFT run), then a tiny CLIP through PathoCLIP stages
I → II. A table of each stage's headline metric at its first and last step, with its held-out
numbers before and after, is printed, and the curves are plotted to `<out>/losses.png`. Each stage
writes its outputs (checkpoints, `metrics.jsonl`, TensorBoard events and plots; curation: its steps'
directories) under `<out>/<stage>/`. SIGTERM stops the running stage at a checkpoint and the walk
with it (exit 143).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from pathor1_jax.errors import EXIT_PREEMPTED, UserError
from pathor1_jax.flags import positive_int
from pathor1_jax.stages import STAGES, run_demo
from pathor1_jax.train.result import StageResult

DEMO_STAGES = [name for name, entry in STAGES.items() if entry.demo is not None]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    parser.add_argument(
        "--steps",
        type=positive_int,
        help="steps per stage (default: each config's; warmup cut to at most steps/8)",
    )
    parser.add_argument("--stages", help=f"comma-separated subset of {DEMO_STAGES} (default: all, in order)")


# ours: LLVM's expensive optimisation passes off for the demo's XLA CPU programs. Compiling the tiny
# models' steps is a large share of the demo's CPU time; on the demo SFT step the compile took 16.3 ->
# 12.9 CPU-s with the step's CPU time and loss unchanged (--xla_backend_optimization_level=0 as well:
# 8.6 CPU-s, but each step 2x slower)
FAST_COMPILE = "--xla_llvm_disable_expensive_passes=true"


def compile_settings(out: Path) -> None:
    """In a process that has not imported jax yet (the settings are read when jax starts; a caller that
    has, e.g. a test, keeps its own): `FAST_COMPILE` added to `XLA_FLAGS`, and jax's persistent
    compilation cache in `<out>/jax_cache` unless `JAX_COMPILATION_CACHE_DIR` names one. The stages
    compile some programs alike (each builds its model from a jitted init: ~8 CPU-s to compile, ~1.6
    from the cache), and a second demo run compiles almost nothing."""
    if "jax" in sys.modules:
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_llvm_disable_expensive_passes" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {FAST_COMPILE}".strip()
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(out.resolve() / "jax_cache"))


WINDOW = 3  # steps averaged at each end of a curve: the table's "first 3" and "last 3"


def curves(row: StageResult) -> list[Path]:
    """The metrics files of a stage's runs, in order: one, or one per chained config (PathoCLIP I → II)."""
    return list(row.metrics_paths) or [row.metrics_path]


def window_means(row: StageResult) -> tuple[float | None, float | None]:
    """Mean of `row.metric` over the first and the last `WINDOW` steps of the stage (a one-step blip
    moves neither much; a stage of chained runs: the first run's first steps, the last run's last);
    the row's own first / last value when it wrote no metrics."""
    from pathor1_jax.train.metrics import read_metrics

    if row.metrics_path is None:
        return row.first, row.last
    values = [r[row.metric] for path in curves(row) for r in read_metrics(path) if row.metric in r]
    if not values:
        return None, None
    return statistics.fmean(values[:WINDOW]), statistics.fmean(values[-WINDOW:])


def summary_table(rows: list[StageResult], seconds: list[float]) -> str:
    """One line per stage: its headline metric averaged over its first and last steps, the change,
    the stage's wall time and its held-out numbers before and after (RL: MCQ accuracy and format rate
    of the model it starts from and of the trained one)."""
    header = (
        f"{'stage':<10} {'metric':<11} {'steps':>5} {f'first {WINDOW}':>9} {f'last {WINDOW}':>9} "
        f"{'change':>8} {'time':>7}"
    )
    lines = [f"{header}  held-out: before -> after"]
    for row, sec in zip(rows, seconds, strict=True):
        evals = ", ".join(
            f"{name} {'n/a' if before is None else f'{before:.3f}'} -> {after:.3f}"
            for name, (before, after) in row.evals.items()
        )
        steps = row.end_step if row.metrics_path else "-"
        first, last = window_means(row)
        change = "-" if first is None or last is None else f"{last - first:+.4f}"
        first, last = ("-" if v is None else f"{v:.4f}" for v in (first, last))
        lines.append(
            f"{row.stage:<10} {row.metric:<11} {steps:>5} {first:>9} {last:>9} {change:>8} "
            f"{sec:>6.0f}s  {evals or row.note}".rstrip()
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    compile_settings(Path(args.out))
    from pathor1_jax.train.metrics import plot_losses

    chosen = args.stages.split(",") if args.stages else DEMO_STAGES
    unknown = sorted(set(chosen) - set(DEMO_STAGES))
    if unknown:
        raise UserError(f"--stages: unknown stage(s) {unknown}; stages are {DEMO_STAGES}")
    out = Path(args.out)
    rows, seconds, ran, measured = [], [], {}, {}  # measured: GRPO and DAPO measure the SFT run once
    for name in DEMO_STAGES:
        if name not in chosen:
            continue
        stage_dir = out / name
        shutil.rmtree(stage_dir, ignore_errors=True)  # the demo always starts fresh
        t0 = time.perf_counter()
        rows.append(run_demo(STAGES[name], stage_dir, ran, args.steps, measured))
        seconds.append(time.perf_counter() - t0)
        ran[name] = stage_dir
        if rows[-1].preempted:
            print(
                f"demo: stopped by SIGTERM during {name} (checkpoint saved under {stage_dir});"
                " later stages not run"
            )
            return EXIT_PREEMPTED
    trained = [r for r in rows if r.metrics_path]  # curation writes data, not metrics
    plotted = ""
    if trained:
        panels = [  # one per run: a stage of chained runs gets a panel for each
            (r, f"{r.stage}{'' if len(curves(r)) == 1 else f' {path.parent.name}'} ({r.metric})", path)
            for r in trained
            for path in curves(r)
        ]
        plot = plot_losses(
            [(label, path) for _, label, path in panels],
            out / "losses.png",
            keys=[r.metric for r, _, _ in panels],
        )
        plotted = f" (curves: {plot})"
    print()
    print(summary_table(rows, seconds))
    print(f"\noutputs, checkpoints, metrics and plots under {out}/{plotted}")
    return 0

"""Where `pathor1 demo`'s time goes: each stage's wall and CPU seconds (CPU = user + sys of this
process's threads and of its children: on a loaded machine wall says little, CPU is what a stage
costs), with the part of it spent tracing, lowering and compiling jitted functions, and how many
compilations that was.

The stages run in this process exactly as `pathor1 demo` runs them (`stages.run_demo`, in order, each
from the runs before it), so the numbers are the demo's, start-up excluded (imports are timed apart).
`--cprofile DIR` also writes each stage's Python profile to `DIR/<stage>.pstats`
(`python -m pstats DIR/sft.pstats`, then `sort tottime`, `stats 30`).

Usage: python bench/demo_time.py [--out /tmp/demo_time] [--stages cpt,sft] [--steps N] [--cprofile DIR]
                                 [--keep-cache]
"""

from __future__ import annotations

import argparse
import cProfile
import resource
import shutil
import time
from collections import defaultdict
from pathlib import Path

from pathor1_jax.flags import positive_int


def cpu_seconds() -> float:
    """User + sys seconds of this process (all threads) and of its waited-for children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="/tmp/demo_time", help="the demo's output directory")
    parser.add_argument(
        "--stages",
        help="comma-separated subset (default: all demo stages); a stage left out whose run is under --out "
        "(e.g. cpt, sft) is what the later stages start from",
    )
    parser.add_argument("--steps", type=positive_int, help="steps per stage (default: each config's)")
    parser.add_argument("--cprofile", help="directory for each stage's cProfile stats")
    parser.add_argument(
        "--keep-cache",
        action="store_true",
        help="keep <out>/jax_cache from an earlier run (default: emptied first, as a fresh clone's demo)",
    )
    args = parser.parse_args()
    if not args.keep_cache:
        shutil.rmtree(Path(args.out) / "jax_cache", ignore_errors=True)

    from pathor1_jax.commands.demo import compile_settings

    compile_settings(Path(args.out))  # as `pathor1 demo` does
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    import jax
    from jax._src import dispatch

    from pathor1_jax.commands.demo import DEMO_STAGES, summary_table
    from pathor1_jax.stages import STAGES, run_demo

    import_cpu, import_wall = cpu_seconds() - cpu0, time.perf_counter() - wall0
    compile_s: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    by_function: dict[str, list[float]] = defaultdict(list)  # backend compile seconds of each
    events = {
        dispatch.JAXPR_TRACE_EVENT: "trace",
        dispatch.JAXPR_TO_MLIR_MODULE_EVENT: "lower",
        dispatch.BACKEND_COMPILE_EVENT: "compile",
    }

    def listener(event: str, duration: float, fun_name: str = "?", **_) -> None:
        if event in events:
            compile_s[events[event]] += duration
            counts[events[event]] += 1
        if event == dispatch.BACKEND_COMPILE_EVENT:
            by_function[fun_name].append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    chosen = args.stages.split(",") if args.stages else DEMO_STAGES
    out = Path(args.out)
    rows, seconds, ran, measured, table = [], [], {}, {}, []
    for name in DEMO_STAGES:
        if name not in chosen:
            if (out / name / "checkpoints").is_dir():  # an earlier run's stage: the next ones start from it
                ran[name] = out / name
            continue
        stage_dir = out / name
        shutil.rmtree(stage_dir, ignore_errors=True)
        compile_s.clear()
        counts.clear()
        by_function.clear()
        cpu, wall = cpu_seconds(), time.perf_counter()
        profile = cProfile.Profile() if args.cprofile else None
        if profile:
            profile.enable()
        rows.append(run_demo(STAGES[name], stage_dir, ran, args.steps, measured))
        if profile:
            profile.disable()
            Path(args.cprofile).mkdir(parents=True, exist_ok=True)
            profile.dump_stats(Path(args.cprofile) / f"{name}.pstats")
        cpu, wall = cpu_seconds() - cpu, time.perf_counter() - wall
        seconds.append(wall)
        ran[name] = stage_dir
        lowering = compile_s["trace"] + compile_s["lower"]
        table.append((name, wall, cpu, lowering, compile_s["compile"], counts["compile"]))
        print(f"[demo_time] {name}: wall {wall:.1f} s, CPU {cpu:.1f} s", flush=True)
        for fun, times in sorted(by_function.items(), key=lambda kv: -sum(kv[1]))[:8]:
            print(f"[demo_time]   compiled {fun}: {len(times)}x, {sum(times):.1f} s", flush=True)

    print()
    print(summary_table(rows, seconds))
    print()
    print(f"imports: wall {import_wall:.1f} s, CPU {import_cpu:.1f} s")
    print(f"{'stage':<10} {'wall s':>8} {'CPU s':>8} {'trace+lower s':>14} {'compile s':>10} {'compiles':>9}")
    for name, wall, cpu, lower, comp, n in table:
        print(f"{name:<10} {wall:>8.1f} {cpu:>8.1f} {lower:>14.1f} {comp:>10.1f} {n:>9d}")
    total_wall, total_cpu = sum(r[1] for r in table), sum(r[2] for r in table)
    print(f"{'total':<10} {total_wall:>8.1f} {total_cpu:>8.1f}")
    print("(compile columns are wall seconds of jax's trace/lower/compile events, inside the stage's wall)")


if __name__ == "__main__":
    main()

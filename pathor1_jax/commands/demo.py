"""`pathor1 demo`: Patho-R1's stages end to end on the embedded pathology data, on CPU, in minutes.

A tiny random-init Qwen2.5-VL goes through the stages of `STAGES` in order (CPT → SFT, each stage
starting from the previous one's weights), then a table of each stage's metric at its first and last
step is printed, and the curves are plotted to `<out>/losses.png`. Each stage writes its checkpoints,
`metrics.jsonl`, TensorBoard events and `loss.png` under `<out>/<stage>/`.

A stage is a `DemoStage`; a later stage of the paper (RL, PathoCLIP) joins the demo by appending one
to `STAGES` whose `run(out_dir, previous_dir, steps)` returns a `StageSummary`.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from pathor1_jax.errors import UserError
from pathor1_jax.rl.demo import rl_demo
from pathor1_jax.train.clip_demo import clip_demo

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@dataclasses.dataclass
class StageSummary:
    name: str
    metric: str  # what `start` / `end` measure, e.g. "loss"
    start: float
    end: float
    steps: int
    metrics_path: Path
    curve: str | None = None  # the metrics.jsonl key to plot; None: `metric`, else `<metric>/mean`

    def curve_key(self) -> str:
        if self.curve:
            return self.curve
        from pathor1_jax.train.metrics import read_metrics

        records = read_metrics(self.metrics_path)
        return self.metric if any(self.metric in r for r in records) else f"{self.metric}/mean"


@dataclasses.dataclass(frozen=True)
class DemoStage:
    """name; run(out_dir, previous_dir or None, steps or None = the config's) -> StageSummary."""

    name: str
    run: Callable[[Path, Path | None, int | None], StageSummary]


def lm_stage(name: str, config_file: str) -> DemoStage:
    """A CPT/SFT stage from `configs/<config_file>`, initialised from the previous stage's run."""

    def run(out_dir: Path, previous: Path | None, steps: int | None) -> StageSummary:
        from pathor1_jax.train.config import load_config
        from pathor1_jax.train.run import run_stage

        overrides = [f"--config.train.out_dir={out_dir}", f"--config.model.init_from={previous or ''}"]
        config = load_config(str(CONFIGS / config_file), overrides)
        if steps is not None:  # a shorter (or longer) run: warmup stays below it
            with config.unlocked():
                config.train.steps = steps
                config.optim.warmup_steps = min(config.optim.warmup_steps, max(1, steps // 8))
        result = run_stage(config)
        return StageSummary(
            name, "loss", result.first_loss, result.last_loss, result.end_step, result.metrics_path
        )

    return DemoStage(name, run)


STAGES: list[DemoStage] = [
    lm_stage("cpt", "demo_cpt.py"),
    lm_stage("sft", "demo_sft.py"),
    DemoStage("grpo", partial(rl_demo, "grpo")),  # each RL stage starts from sft (see pathor1_jax.rl.demo)
    DemoStage("dapo", partial(rl_demo, "dapo")),
    DemoStage("pathoclip", clip_demo),  # PathoCLIP stage I → II (independent of the stages above)
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    parser.add_argument(
        "--steps", type=int, help="steps per stage (default: each config's; warmup shortened to fit)"
    )
    parser.add_argument(
        "--stages", help=f"comma-separated subset of {[s.name for s in STAGES]} (default: all, in order)"
    )


def summary_table(rows: list[StageSummary], seconds: list[float]) -> str:
    lines = [f"{'stage':<10} {'metric':<8} {'steps':>5} {'start':>9} {'end':>9} {'time':>7}"]
    for row, sec in zip(rows, seconds, strict=True):
        lines.append(
            f"{row.name:<10} {row.metric:<8} {row.steps:>5} {row.start:>9.4f} {row.end:>9.4f} {sec:>6.0f}s"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from pathor1_jax.train.metrics import plot_losses

    names = [s.name for s in STAGES]
    chosen = args.stages.split(",") if args.stages else names
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        raise UserError(f"--stages: unknown stage(s) {unknown}; stages are {names}")
    out = Path(args.out)
    rows, seconds, previous = [], [], None
    for stage in STAGES:
        if stage.name not in chosen:
            continue
        stage_dir = out / stage.name
        shutil.rmtree(stage_dir, ignore_errors=True)  # the demo always starts fresh
        t0 = time.perf_counter()
        rows.append(stage.run(stage_dir, previous, args.steps))
        seconds.append(time.perf_counter() - t0)
        previous = stage_dir
    plot = plot_losses(
        [(f"{r.name} ({r.metric})", r.metrics_path) for r in rows],
        out / "losses.png",
        keys=[r.curve_key() for r in rows],
    )
    print()
    print(summary_table(rows, seconds))
    print(f"\ncheckpoints, metrics and plots under {out}/ (curves: {plot})")
    return 0

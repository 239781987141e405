"""What a run of any stage returns (CPT, SFT, GRPO, DAPO, PathoCLIP; curation's demo): the
`pathor1 train` summary line and the rows of the `pathor1 demo` table are read from it."""

from __future__ import annotations

import dataclasses
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class StageResult:
    """stage: `config.stage`. metric: the run's headline, a key of its `metrics.jsonl` ("loss"; RL:
    "reward/mean"), and first / last: its value at the first and last step run here (None: no step
    ran). start_step > 0: resumed from that step's checkpoint. preempted: stopped by SIGTERM after
    saving a checkpoint. evals: held-out numbers before and after training, `name → (before, after)`
    (before None: no starting model to measure), filled in by `pathor1 demo`. A stage that trains
    nothing (curation) has no metrics_path and no steps; note: what its demo row adds in words.
    metrics_paths: a demo stage of chained runs (PathoCLIP I → II): each run's `metrics.jsonl` in
    order, the last being metrics_path; empty for a stage of one run."""

    stage: str
    out_dir: Path
    metrics_path: Path | None
    start_step: int
    end_step: int
    metric: str
    first: float | None
    last: float | None
    preempted: bool
    evals: dict[str, tuple[float | None, float]] = dataclasses.field(default_factory=dict)
    note: str = ""
    metrics_paths: tuple[Path, ...] = ()

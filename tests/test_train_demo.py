"""`pathor1 demo`, shortened to 10 steps per stage: the CPT and SFT losses fall (read from each run's
own metrics.jsonl), SFT starts from the CPT weights, and checkpoints, plots and the table exist."""

from __future__ import annotations

import math

import jax
import numpy as np

from pathor1_jax.cli import main
from pathor1_jax.train.checkpoint import Checkpointer
from pathor1_jax.train.metrics import read_metrics

STEPS = 10


def test_demo_cpt_then_sft_losses_fall(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", str(STEPS), "--stages", "cpt,sft"]) == 0
    losses = {}
    for stage in ("cpt", "sft"):
        records = read_metrics(out / stage / "metrics.jsonl")
        assert [r["step"] for r in records] == list(range(1, STEPS + 1))
        losses[stage] = np.array([r["loss"] for r in records])
        first, last = losses[stage][:3].mean(), losses[stage][-3:].mean()
        assert last < first - 0.3, (stage, losses[stage])
        assert Checkpointer(out / stage / "checkpoints").latest_step() == STEPS
        assert (out / stage / "loss.png").stat().st_size > 0
    # random init predicts uniformly over the vocabulary; SFT starts from the trained CPT weights
    assert abs(losses["cpt"][0] - math.log(151936)) < 0.1
    assert losses["sft"][0] < losses["cpt"][0] - 0.1  # random init would start at ln V again
    assert (out / "losses.png").stat().st_size > 0
    captured = capsys.readouterr()
    table = captured.out
    for stage in ("cpt", "sft"):  # the text decoder's attention and the vision tower's block-sparse one
        ran = f"{stage}: ran on {jax.device_count()} × cpu (cpu); kernels traced: attention xla, xla_blocked"
        assert ran in captured.err
    assert "stage      metric      steps   first 3    last 3   change" in table
    for stage in ("cpt", "sft"):  # the loss averaged over the first and the last 3 steps
        first, last = losses[stage][:3].mean(), losses[stage][-3:].mean()
        row = f"{stage:<10} loss           {STEPS} {first:>9.4f} {last:>9.4f} {last - first:>+8.4f}"
        assert row in table, (row, table)

"""`pathor1 demo`, shortened: the CPT and SFT losses fall over 10 steps each (read from each run's own
metrics.jsonl), SFT starts from the CPT weights, checkpoints, plots and the table exist; and the demo's
GRPO stage, from that SFT model, raises its mean reward (issue 12 item 7's CI check: with
PATHOR1_DEMO_RL=1 only, as `make long`, CI's second step, runs it; see RL_LR)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import statistics
from pathlib import Path

import jax
import numpy as np
import pytest

from pathor1_jax import stages
from pathor1_jax.cli import main
from pathor1_jax.data.demo import demo_dir
from pathor1_jax.train.checkpoint import Checkpointer
from pathor1_jax.train.config import load_config
from pathor1_jax.train.metrics import read_metrics

STEPS = 10


@pytest.fixture(scope="module")
def demo_walk(tmp_path_factory):
    """`pathor1 demo --stages cpt,sft --steps 10`, run once for the module: (exit code, its --out,
    stdout, stderr)."""
    out = tmp_path_factory.mktemp("walk") / "demo"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["demo", "--out", str(out), "--steps", str(STEPS), "--stages", "cpt,sft"])
    return code, out, stdout.getvalue(), stderr.getvalue()


def test_demo_cpt_then_sft_losses_fall(demo_walk):
    code, out, table, err = demo_walk
    assert code == 0
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
    for stage in ("cpt", "sft"):  # the text decoder's attention and the vision tower's block-sparse one
        ran = f"{stage}: ran on {jax.device_count()} × cpu (cpu); kernels traced: attention xla, xla_blocked"
        assert ran in err
    assert "stage      metric      steps   first 3    last 3   change" in table
    for stage in ("cpt", "sft"):  # the loss averaged over the first and the last 3 steps
        first, last = losses[stage][:3].mean(), losses[stage][-3:].mean()
        row = f"{stage:<10} loss           {STEPS} {first:>9.4f} {last:>9.4f} {last - first:>+8.4f}"
        assert row in table, (row, table)


def demo_subset(kind: str, keep, path: Path, answer=None) -> Path:
    """The embedded demo records of `kind` (train split) whose id passes `keep`, written to `path`
    with absolute image paths; `answer(text)` rewrites a chat's assistant turn."""
    lines = []
    for line in Path(demo_dir(), f"{kind}_train.jsonl").read_text().splitlines():
        record = json.loads(line)
        if keep(record["id"]):
            if answer is not None:
                record["messages"][-1]["content"] = answer(record["messages"][-1]["content"])
            lines.append(json.dumps(record).replace('"tiles/', f'"{demo_dir()}/tiles/'))
    path.write_text("\n".join(lines) + "\n")
    return path


# ours, the RL check's settings (each measured on this 2-core host under the suite's settings). The
# 10-step walk's SFT model writes no `<think>…</think><answer>…</answer>` answer. SFT_STEPS more steps
# on the colon tiles' tissue chats, each answered in the shortest format the reward accepts with a
# random letter (`<think>\n</think><answer>B</answer>`), LM attention trained, teach the format
# (sampled format rate > 0.8 at GRPO's first step after 60 and 80 steps) and leave the letter open.
# GRPO then trains on the colon tiles' tissue question (answer A) at lr 5e-3: after 80 SFT steps the
# mean reward went 0.094, 0.219, 0.344, 0.312, 0.500, 0.562, 0.688, 0.500 (+0.365, first 3 -> last 3;
# over the first 6: +0.240), after 60 SFT steps 0.531 -> 0.875 in 6 (+0.250). With this check's
# earlier design on the current demo data (the tissue chats of all three tissues, answered right) the
# model already answered A on the colon tiles (0.84-1.0: nothing to learn); without the colon chats it
# never wrote A (0 at every step: no advantage to learn from). Earlier runs of this check with negated
# advantages fell (0.31 -> 0), with zero advantages moved by the step mean's noise (+0.125 at 4 prompts
# a step). Cost: ~260 CPU-s beyond the walk, over the suite's budget, so it runs with
# PATHOR1_DEMO_RL=1: in CI's second step (`make long`)
SFT_STEPS, RL_STEPS, RL_LR = 80, 8, 5e-3


@pytest.mark.skipif(
    os.environ.get("PATHOR1_DEMO_RL") != "1", reason="~260 CPU-s: runs with PATHOR1_DEMO_RL=1 (see RL_LR)"
)
def test_demo_grpo_reward_rises(demo_walk, tmp_path):
    """The demo's GRPO stage (configs/grpo_tiny.py: its group size, batch, temperature, β, frozen
    parameters; lr, steps and data as above) from the walk's SFT model raises its mean reward: last 3
    steps over first 3 by >= 0.2 (the issue's target for the demo), where a step that does not learn
    (zero advantages, no update, all frozen) moves by the step mean's noise and a wrong sign falls
    (measured above). > 30 s: 80 SFT and 8 GRPO steps, and their programs compile here."""
    _, out, _, _ = demo_walk
    letters = random.Random(0)
    chats = demo_subset(
        "chat",
        lambda rid: rid.startswith("ihc_colon") and rid.endswith("-tissue-sft"),
        tmp_path / "chats.jsonl",
        answer=lambda text: f"<think>\n</think><answer>{letters.choice('ABC')}</answer>",
    )
    mcqs = demo_subset(
        "mcq", lambda rid: rid.startswith("ihc_colon") and rid.endswith("-tissue"), tmp_path / "mcqs.jsonl"
    )
    sft = load_config(
        "configs/demo_sft.py",
        [
            f"--config.model.init_from={out / 'sft'}",
            f"--config.train.out_dir={tmp_path / 'sft'}",
            f"--config.data.source={chats}",
            "--config.data.format=jsonl",
            "--config.data.kind=chat",
            f"--config.train.steps={SFT_STEPS}",
            f"--config.train.ckpt_every={SFT_STEPS}",
            "--config.optim.warmup_steps=1",
            "--config.optim.min_lr_ratio=1.0",
        ],
    )
    with sft.unlocked():
        sft.freeze = (r"^model\.visual\.",)
    stages.run(sft)
    grpo = load_config(
        "configs/grpo_tiny.py",
        [
            f"--config.model.init_from={tmp_path / 'sft'}",
            f"--config.train.out_dir={tmp_path / 'grpo'}",
            f"--config.data.source={mcqs}",
            "--config.data.format=jsonl",
            f"--config.train.steps={RL_STEPS}",
            f"--config.train.ckpt_every={RL_STEPS}",
            f"--config.optim.lr={RL_LR}",
            "--config.rl.max_new_tokens=16",
        ],
    )
    stages.run(grpo)
    records = read_metrics(tmp_path / "grpo" / "metrics.jsonl")
    rewards = [r["reward/mean"] for r in records]
    first, last = statistics.fmean(rewards[:3]), statistics.fmean(rewards[-3:])
    assert [r["step"] for r in records] == list(range(1, RL_STEPS + 1))
    assert records[0]["reward/format_rate"] > 0.8, records[0]
    assert last > first + 0.2, rewards

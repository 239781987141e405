"""PathoCLIP training: the two-stage run on the embedded captions, through `pathor1 train`."""

from __future__ import annotations

import json

from pathor1_jax.cli import main

CONFIG = "configs/pathoclip_tiny.py"


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_stages_loss_falls_and_stage2_continues_from_stage1(tmp_path):
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    common = ["--config.optim.warmup_steps=2", "--config.train.ckpt_every=100"]
    assert main(["train", "--config", f"{CONFIG}:stage1", f"--config.train.out_dir={stage1}",
                 "--config.train.steps=12", *common]) == 0  # fmt: skip
    first = _losses(stage1)
    assert first[-1] < first[0]
    assert main(["train", "--config", f"{CONFIG}:stage2", f"--config.train.out_dir={stage2}",
                 f"--config.model.init_from={stage1}", "--config.train.steps=3", *common]) == 0  # fmt: skip
    # stage II starts from stage I's weights: its first loss is far below a fresh model's
    assert _losses(stage2)[0] < first[0] - 0.1


def test_contrastive_batches_cannot_accumulate(tmp_path, capsys):
    argv = ["train", "--config", f"{CONFIG}:stage1", f"--config.train.out_dir={tmp_path}"]
    assert main([*argv, "--config.train.grad_accum=2"]) == 2
    assert "train.grad_accum: the contrastive loss of a batch does not split" in capsys.readouterr().err


def test_shardings_table_of_a_clip_config(capsys):
    assert main(["shardings", "--config", CONFIG, "--devices", "8"]) == 0
    table = capsys.readouterr().out
    assert "text_model.token_embedding.embedding" in table and "(vocab, embed)" in table
    # layers stacked (scanned): one row per stacked parameter, its leading axis named "layers"
    assert "vision_model.layers.self_attn.q_proj.kernel" in table
    assert "(layers, vision_embed, vision_heads)" in table

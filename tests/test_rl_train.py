"""`run_rl` on the trainer: a tiny GRPO run from random init on the demo MCQs, its metrics, checkpoints
and resume."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from pathor1_jax import stages
from pathor1_jax.errors import ConfigError
from pathor1_jax.rl.train import RLTrainer, run_rl
from pathor1_jax.train.config import load_config
from pathor1_jax.train.loading import load_for_inference

OVERRIDES = [
    "--config.model.init_from=",
    "--config.train.steps=2",
    "--config.train.ckpt_every=1",
    "--config.rl.group_size=2",
    "--config.rl.batch_groups=2",
    "--config.rl.groups_per_minibatch=2",
    "--config.rl.max_new_tokens=8",
]


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("grpo")
    config = load_config("configs/grpo_tiny.py", [*OVERRIDES, f"--config.train.out_dir={out}"])
    return config, out, run_rl(config)


def test_grpo_run_writes_metrics_and_checkpoints(grpo_run):
    _, out, result = grpo_run
    assert result.end_step == 2 and not result.preempted
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    first = records[0]
    # μ = 1, one mini-batch: the update sees the policy that sampled, which is also the reference
    assert first["update/mean_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert first["update/clip_fraction"] == 0.0
    assert first["update/kl"] == pytest.approx(0.0, abs=1e-6)
    for key in (
        "reward/mean",
        "reward/accuracy",
        "reward/format_rate",
        "response/mean_length",
        "response/max_length",
        "response/overlong_fraction",
        "update/clip_fraction",
        "update/kl",
        "dynamic_sampling/filtered_fraction",
        "time/rollout_s",
        "time/logprobs_s",
        "time/update_s",
    ):
        assert key in first
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["1", "2"]
    assert (out / "reward.png").exists()


def test_grpo_run_resumes_prompts_and_sampling_rounds(grpo_run):
    _, out, _ = grpo_run
    overrides = [
        *OVERRIDES,
        "--config.train.steps=3",
        "--config.rl.beta=0.0",
        f"--config.train.out_dir={out}",
    ]
    config = load_config("configs/grpo_tiny.py", overrides)  # β = 0: no reference model to build
    trainer = RLTrainer(config, out)
    assert trainer.start_step == 2
    assert int(trainer.state["step"]) == 2  # one update per RL step here
    assert trainer.prompts.position == 4 and trainer.sampler.seed == 2
    trainer.checkpointer.close()
    # `pathor1 eval mcq --model <run dir>` loads the same (latest) parameters
    model, _ = load_for_inference(out)
    loaded = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, loaded, jax.device_get(trainer.state["params"]))


@pytest.mark.parametrize(
    "override,message",
    [
        ("--config.rl.l_cache=100", "l_cache"),  # the cache zone longer than L_max = max_new_tokens = 64
        ("--config.rl.groups_per_minibatch=3", "groups_per_minibatch"),
        ("--config.rl.short_batch=pad", "short_batch='pad'"),
        ("--config.rl.prompt_style=cot", "rl.prompt_style='cot': expected one of"),
        ("--config.rl.loss_agg=sum", "rl.loss_agg='sum': expected one of"),
        ("--config.rl.dual_clip=0.5", "rl.dual_clip=0.5: expected 0 \\(off\\) or a finite number > 1"),
        ("--config.rl.advantage_std=sample", "rl.advantage_std='sample': expected one of"),
        ("--config.rl.temperature=0.0", "rl.temperature=0.0: expected a finite number > 0"),
    ],
)
def test_bad_rl_configs_fail_before_building_anything(tmp_path, override, message):
    config = load_config("configs/dapo_tiny.py", [override, f"--config.train.out_dir={tmp_path / 'run'}"])
    with pytest.raises(ValueError, match=message):
        run_rl(config)
    assert not (tmp_path / "run").exists()  # nothing written


def test_rl_on_other_records_is_refused_by_the_stage_registry(tmp_path):
    config = load_config(
        "configs/grpo_tiny.py", ["--config.data.kind=chat", f"--config.train.out_dir={tmp_path}"]
    )
    with pytest.raises(ConfigError, match="config.data.kind='chat' but stage 'grpo' trains on 'mcq' records"):
        stages.run(config)

"""The RL stages of `pathor1 demo`: GRPO or DAPO of the demo SFT model on the embedded MCQs, with the
held-out MCQ accuracy (greedy) before and after.

Each RL stage starts from the SFT stage's run (`<out>/sft`), also when it follows another RL stage,
so `pathor1 demo --stages cpt,sft,dapo` runs DAPO instead of GRPO.
"""

from __future__ import annotations

from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RL_STAGES = ("grpo", "dapo")


def rl_demo(algo: str, out_dir: Path, previous: Path | None, steps: int | None):
    """Run `configs/<algo>_tiny.py` from the SFT run; print held-out MCQ accuracy before and after.
    Returns the demo's `StageSummary` of the mean reward at the first and last step."""
    from pathor1_jax.commands.demo import StageSummary
    from pathor1_jax.data.demo import demo_records
    from pathor1_jax.eval.mcq import evaluate_mcq, load_for_eval
    from pathor1_jax.rl.train import run_rl
    from pathor1_jax.train.config import load_config

    start = previous.parent / "sft" if previous is not None and previous.name in RL_STAGES else previous
    overrides = [f"--config.train.out_dir={out_dir}", f"--config.model.init_from={start or ''}"]
    if steps is not None:
        overrides.append(f"--config.train.steps={steps}")
    config = load_config(str(CONFIGS / f"{algo}_tiny.py"), overrides)
    held_out = demo_records("mcq", "test")
    budget = int(config.rl.max_new_tokens)

    def accuracy(model_dir: Path | None) -> str:
        if model_dir is None:
            return "n/a (no previous stage)"
        model, processor = load_for_eval(model_dir)
        style = config.rl.prompt_style
        result = evaluate_mcq(
            model, processor, held_out, max_new_tokens=budget, prompt_style=style, progress=False
        )
        return f"accuracy {result.accuracy:.3f}, format rate {result.format_rate:.3f}"

    before = accuracy(start)
    result = run_rl(config)
    after = accuracy(out_dir)
    print(f"{algo}: held-out MCQ ({len(held_out)}, greedy) before: {before}")
    print(f"{algo}: held-out MCQ ({len(held_out)}, greedy) after:  {after}")
    print(f"{algo}: mean reward first step {result.first_reward:.4f}, last step {result.last_reward:.4f}")
    return StageSummary(
        algo, "reward", result.first_reward, result.last_reward, result.end_step, result.metrics_path
    )

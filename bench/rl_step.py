"""RL rollout throughput (pathor1_jax `generate`, jitted KV-cache loop, vs Hugging Face `generate`),
the wall-time split of one GRPO step (rollout / old+ref log-probs / policy updates), and a
learnability check (mean reward per step of GRPO and DAPO on a task a random policy can learn).

Same tiny Qwen2.5-VL for both (ours loaded from the HF model's checkpoint), same batch: N prompts
with one 56² image each, G samples per prompt, temperature 1, a fixed number of new tokens (HF with
`min_new_tokens` so that it never stops early). Compilation is excluded (one warm-up call / step).

Learnability task: the answer letter is 'ABCD'[first sampled token % 4] and the truth is always A;
sampling is top-k 4, so a policy that moves probability onto its top tokens ≡ 0 (mod 4) wins.
Usage: python bench/rl_step.py [--prompts 4] [--group 4] [--new-tokens 64] [--repeats 3] [--learn-steps 10]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import optax
import torch
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from qwen_reference import image_prompt, random_hf_model, random_pixels  # noqa: E402

from pathor1_jax.models import qwen2_5_vl  # noqa: E402
from pathor1_jax.rl import rewards  # noqa: E402
from pathor1_jax.rl.rollout import Prompt, pad_prompts, rollout, sample_images  # noqa: E402
from pathor1_jax.rl.step import LossConfig, RolloutSampler, rl_step  # noqa: E402
from pathor1_jax.train.step import StepSpec, init_state  # noqa: E402

GRID = (1, 4, 4)  # a 56×56 image: 16 patches, 4 image tokens


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up / compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_prompts(n: int) -> list[Prompt]:
    rng = np.random.default_rng(0)
    prompts = []
    for i in range(n):
        ids = np.asarray(image_prompt([GRID], rng.integers(1000, 5000, size=24 + i).tolist()), np.int32)
        prompts.append(Prompt(ids, "ABCD"[i % 4], random_pixels([GRID], seed=i), np.array([GRID])))
    return prompts


def learn(algo: str, steps: int) -> list[tuple[float, float]]:
    """(mean reward, accuracy) per step of `steps` RL steps on the learnability task (lr 3e-3)."""
    config = qwen2_5_vl.tiny_config()
    model = qwen2_5_vl.Qwen2_5_VLForConditionalGeneration(config, rngs=nnx.Rngs(0))
    tx = optax.adam(3e-3)
    graphdef, state = init_state(model, tx, 0)
    reference = qwen2_5_vl.Qwen2_5_VLForConditionalGeneration(config, rngs=nnx.Rngs(0))
    prompts = [dataclasses.replace(p, answer="A") for p in make_prompts(16)]
    cursor = iter(range(10**9))

    def reward(text, answer, num_tokens):
        if algo == "grpo":
            return rewards.grpo_reward(text, answer)
        return rewards.dapo_reward(text, answer, num_tokens, l_max=4, l_cache=2)

    def rollout_fn(policy, ps, seed):
        return rollout(
            policy, ps, group_size=8, max_new_tokens=2, decode=first_token_letter, reward_fn=reward,
            temperature=1.0, top_k=4, seed=seed,
        )  # fmt: skip

    sampler = RolloutSampler(lambda n: [prompts[next(cursor) % len(prompts)] for _ in range(n)], rollout_fn)
    cfg = LossConfig(algo=algo, group_size=8)
    history = []
    for _ in range(steps):
        state, metrics = rl_step(
            StepSpec(graphdef, tx), state, sampler, cfg, batch_groups=4, groups_per_minibatch=2, mu=1,
            max_rounds=3, max_new_tokens=2, pad_token_id=config.text.eos_token_id, reference=reference,
            short_batch="train",  # DAPO often keeps < 4 groups in 3 rounds here: train on what it has
        )  # fmt: skip
        history.append((metrics["reward/mean"], metrics["reward/accuracy"]))
    return history


def first_token_letter(tokens) -> str:
    """Stands in for the tokenizer: the first sampled token picks the answer letter."""
    return f"<think>t</think><answer>{'ABCD'[tokens[0] % 4]}</answer>"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--learn-steps", type=int, default=10, help="0 skips the learnability check")
    args = parser.parse_args()
    config = qwen2_5_vl.tiny_config()
    hf = random_hf_model(config)
    hf.train(False)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        model = qwen2_5_vl.load_pretrained(tmp)

    prompts = make_prompts(args.prompts)
    g, new = args.group, args.new_tokens
    pad = config.text.eos_token_id
    ids, mask = pad_prompts(prompts, g, pad)
    pixels, grids = sample_images(prompts, np.arange(len(ids)), g)
    batch = len(ids)

    def ours():
        out = qwen2_5_vl.generate(
            model, ids, mask, pixels, grids, max_new_tokens=new, temperature=1.0, seed=1, pad_token_id=pad
        )
        jax.block_until_ready(out)

    t_inputs = dict(
        input_ids=torch.as_tensor(ids, dtype=torch.long),
        attention_mask=torch.as_tensor(mask, dtype=torch.long),
        pixel_values=torch.as_tensor(pixels),
        image_grid_thw=torch.as_tensor(grids),
        mm_token_type_ids=torch.as_tensor((ids == config.image_token_id).astype(np.int64)),
    )

    def hf_generate():
        with torch.no_grad():
            out = hf.generate(
                **t_inputs, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                max_new_tokens=new, min_new_tokens=new, pad_token_id=pad,
            )  # fmt: skip
        assert out.shape[1] - ids.shape[1] == new

    ours_s = median_time(ours, args.repeats)
    hf_s = median_time(hf_generate, args.repeats)
    tokens = batch * new

    tx = optax.adam(1e-5)
    graphdef, state = init_state(model, tx, 0)
    spec = StepSpec(graphdef, tx)
    with tempfile.TemporaryDirectory() as tmp:  # GRPO's frozen reference: the same starting weights
        hf.save_pretrained(tmp)
        reference = qwen2_5_vl.load_pretrained(tmp)
    cursor = iter(range(10**9))

    def rollout_fn(policy, ps, seed):
        return rollout(
            policy, ps, group_size=g, max_new_tokens=new, decode=first_token_letter, temperature=1.0,
            seed=seed, reward_fn=lambda text, answer, n: rewards.grpo_reward(text, answer),
        )  # fmt: skip

    sampler = RolloutSampler(lambda n: [prompts[next(cursor) % len(prompts)] for _ in range(n)], rollout_fn)
    cfg = LossConfig(algo="grpo", group_size=g, beta=0.04)
    minibatch = max(1, args.prompts // 2)
    splits = []
    for _ in range(1 + args.repeats):  # the first step compiles
        state, metrics = rl_step(
            spec, state, sampler, cfg, batch_groups=args.prompts, groups_per_minibatch=minibatch,
            mu=1, max_rounds=1, max_new_tokens=new, pad_token_id=pad, reference=reference,
        )  # fmt: skip
        splits.append([metrics["time/rollout_s"], metrics["time/logprobs_s"], metrics["time/update_s"]])
    split = np.median(np.asarray(splits[1:]), axis=0)

    print(
        f"Rollout: tiny Qwen2.5-VL, {args.prompts} prompts × G={g} = {batch} samples, one 56² image each, "
        f"{new} new tokens, temperature 1, {jax.devices()[0].platform}"
    )
    print(f"{'generate':<24}{'seconds':>10}{'tokens/s':>12}")
    print(f"{'pathor1_jax (jit)':<24}{ours_s:>10.3f}{tokens / ours_s:>12.0f}")
    print(f"{'HF transformers (torch)':<24}{hf_s:>10.3f}{tokens / hf_s:>12.0f}")
    print(f"{'ratio ours / HF':<24}{'':>10}{hf_s / ours_s:>12.2f}")
    print()
    print(f"One GRPO step (β=0.04, μ=1, 2 mini-batches), median of {args.repeats} after a compile step")
    print(f"{'phase':<24}{'seconds':>10}{'share':>8}")
    for name, sec in zip(("rollout + rewards", "old + ref log-probs", "policy updates"), split, strict=True):
        print(f"{name:<24}{sec:>10.3f}{sec / split.sum():>8.0%}")
    print(f"{'total':<24}{split.sum():>10.3f}")
    if args.learn_steps:
        curves = {algo: learn(algo, args.learn_steps) for algo in ("grpo", "dapo")}
        print()
        print("Learnability task (truth A = first token ≡ 0 mod 4, top-k 4, 4 prompts × G=8, lr 3e-3)")
        print(f"{'step':<6}{'GRPO reward':>12}{'GRPO acc':>10}{'DAPO reward':>13}{'DAPO acc':>10}")
        for step, (g_row, d_row) in enumerate(zip(curves["grpo"], curves["dapo"], strict=True), 1):
            print(f"{step:<6}{g_row[0]:>12.3f}{g_row[1]:>10.3f}{d_row[0]:>13.3f}{d_row[1]:>10.3f}")


if __name__ == "__main__":
    main()

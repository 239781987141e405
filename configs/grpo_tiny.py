"""GRPO (Patho-R1 Eq. 1, reward Eq. 3) of the tiny Qwen2.5-VL on the embedded demo MCQs, on CPU;
`pathor1 demo` runs it after SFT. Sizes are our choice (2 CPU cores)."""

import ml_collections

from pathor1_jax.rl.train import rl_config


def get_config() -> ml_collections.ConfigDict:
    config = rl_config("grpo")
    config.model.init_from = "runs/demo/sft"  # the SFT stage's run directory ("" = random init)
    config.rl.group_size = 4
    # ours: 8 prompts a step (32 samples): with 4 the step's mean reward swung 0.0-0.56 with the
    # prompts drawn, more than the rise to be measured
    config.rl.batch_groups = 8
    config.rl.groups_per_minibatch = 4
    config.rl.max_new_tokens = 48  # the demo's answers take ~25 tokens
    config.rl.prompt_len = 96  # the longest demo MCQ prompt (patho_r1 style) is 96 tokens
    config.rl.beta = 0.04
    # ours: sampling temperature (the log-probs use it too). At 1.0 the SFT model's sampled answers
    # break the <think>/<answer> format (format rate 0.69 on the first batch, greedy: 1.0); at 0.5
    # 0.94 (one batch of 16 each, from the demo SFT model)
    config.rl.temperature = 0.5
    # ours: Adam's first step moves every weight by ~lr whatever the gradient's size; at 2e-3 one
    # update broke the format (sampled format rate 0.94 -> 0.63, KL 0.87 at the first step); at 2e-4
    # GRPO kept it (0.88-1.0 over 8 steps, KL <= 0.09); 5e-4 with the LM's attention frozen (below)
    config.optim.lr = 5e-4
    # the vision tower frozen, as in SFT and the 3B/7B RL configs; ours: the tied embedding (= LM
    # head) too: its gradient reaches all 151,936 rows. Trained, GRPO's sampled format rate fell to
    # 0.56-0.81 by steps 5-6 (KL 0.13); frozen, it stayed 0.88-1.0 (lr 2e-4, temperature 0.5)
    # ours: the LM's attention frozen too, as in the demo SFT (it keeps the model's reading of the tile)
    config.freeze = (r"^model\.visual\.", r"^model\.language_model\.embed_tokens\.", r"self_attn")
    # ours: 16 steps. From the demo SFT model (200 steps) GRPO's mean reward went 0.281 -> 0.531, first
    # 3 -> last 3 steps (+0.250; sampled format rate 0.41-0.91), held-out MCQ accuracy 0.567 -> 0.589,
    # format rate 0.922 -> 0.967 (one run); from an SFT model that answered every tissue alike: +0.04
    # (8 steps), accuracy 0.411 -> 0.300. In the full `pathor1 demo` walk (fresh clone, idle host,
    # 2026-11-26; the SFT model answers C on 89 of 90 held-out MCQs): 0.375 -> 0.406 (+0.031),
    # accuracy 0.533 -> 0.533. On an H100 (3 seeds, 16 steps; mean rise): lr 5e-4 +0.01 / +0.08 (two
    # SFT models), 1e-3 +0.01, 32 steps -0.01, temperature 1.0 +0.03, the LM's attention trained +0.11
    # (format collapses, then recovers); the step mean swings by ~0.15 with the prompts drawn
    config.train.steps = 16
    config.train.ckpt_every = 8
    config.train.out_dir = "runs/demo/grpo"
    return config

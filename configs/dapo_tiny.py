"""DAPO (Patho-R1 Eq. 2, reward Eq. 4, dynamic sampling) of the tiny Qwen2.5-VL on the embedded demo
MCQs, on CPU; `pathor1 demo --rl dapo` runs it after SFT. Sizes are our choice (2 CPU cores)."""

import ml_collections

from pathor1_jax.rl.train import rl_config


def get_config() -> ml_collections.ConfigDict:
    config = rl_config("dapo")
    config.model.init_from = "runs/demo/sft"  # the SFT stage's run directory ("" = random init)
    config.rl.group_size = 4
    # ours: 8 prompts a step (32 samples): with 4 the step's mean reward swung 0.0-0.56 with the
    # prompts drawn, more than the rise to be measured
    config.rl.batch_groups = 8
    config.rl.groups_per_minibatch = 4
    config.rl.max_new_tokens = 48  # the demo's answers take ~25 tokens
    config.rl.prompt_len = 96  # the longest demo MCQ prompt (patho_r1 style) is 96 tokens
    config.rl.l_cache = 16
    config.rl.dapo_reward = "soft"  # the literal Eq. 4 is binary; see pathor1_jax.rl.rewards
    config.rl.max_rounds = 3
    config.rl.short_batch = "train"  # a 4-prompt batch often runs short; the demo trains on it
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
    # ours: 16 steps, as GRPO (whose mean reward rose by 0.250 from the demo SFT model). DAPO from the
    # same model: mean reward -0.302 -> -0.427, first 3 -> last 3 steps (-0.125; sampled accuracy
    # 0.19-0.56), held-out MCQ accuracy 0.567 -> 0.567, format rate 0.922 -> 0.933 (one run): it does
    # not learn yet (issue 12 item 7)
    config.train.steps = 16
    config.train.ckpt_every = 8
    config.train.out_dir = "runs/demo/dapo"
    return config

"""GRPO (Patho-R1 Eq. 1, reward Eq. 3) of the tiny Qwen2.5-VL on the embedded demo MCQs, on CPU;
`pathor1 demo` runs it after SFT. Sizes are our choice (2 CPU cores)."""

import ml_collections

from pathor1_jax.rl.train import rl_config


def get_config() -> ml_collections.ConfigDict:
    config = rl_config("grpo")
    config.model.init_from = "runs/demo/sft"  # the SFT stage's run directory ("" = random init)
    config.rl.group_size = 4
    config.rl.batch_groups = 4
    config.rl.groups_per_minibatch = 2
    config.rl.max_new_tokens = 48  # the demo's answers take ~25 tokens
    config.rl.prompt_len = 96  # the longest demo MCQ prompt (patho_r1 style) is 96 tokens
    config.rl.beta = 0.04
    config.optim.lr = 1e-4
    config.train.steps = 10
    config.train.ckpt_every = 5
    config.train.out_dir = "runs/demo/grpo"
    return config

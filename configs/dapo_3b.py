"""DAPO of Qwen2.5-VL-3B from the SFT checkpoint on diagnosis-oriented MCQs (Patho-R1 stage 3).

Paper-fixed: the objective and reward (Eq. 2 / Eq. 4 read literally, dynamic sampling, clip-higher).
The clip-higher values 0.2 / 0.28 are the DAPO paper's (Patho-R1 gives none). The paper does not
publish its RL hyperparameters: G, batch sizes, learning rate, response budget, L_cache, rounds, μ
and the mesh are our choice (common values of open GRPO/DAPO recipes; `rl_defaults` labels each).
"""

import ml_collections

from pathor1_jax.rl.train import rl_config


def get_config() -> ml_collections.ConfigDict:
    config = rl_config("dapo")
    config.model.preset = "3b"
    config.model.init_from = "runs/sft_3b"  # the SFT run directory (or an exported HF checkpoint)
    config.model.dtype = "bfloat16"
    config.model.remat = "full"  # ours: each layer recomputed in the backward pass of the update
    config.data.source = "data/rl_mcq.jsonl"  # the 10k diagnosis-oriented MCQs
    config.data.min_pixels = 256 * 28 * 28
    config.data.max_pixels = 1024 * 28 * 28
    config.rl.group_size = 8
    config.rl.batch_groups = 64
    config.rl.groups_per_minibatch = 16
    config.rl.mu = 1
    config.rl.max_new_tokens = 1024
    config.rl.prompt_len = 1536  # up to 1024 image tokens + the question
    config.rl.l_cache = 256
    config.rl.max_rounds = 4
    config.optim.lr = 1e-6
    config.freeze = (r"^model\.visual\.",)  # vision tower frozen, as in SFT
    config.train.steps = 300
    config.train.ckpt_every = 25
    config.train.out_dir = "runs/dapo_3b"
    config.mesh = dict(data=1, fsdp=-1, tensor=1)  # ours: FSDP over every chip (v5e-16)
    return config

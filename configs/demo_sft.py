"""`pathor1 demo` stage 2: SFT of the demo CPT model on the embedded chain-of-thought chats, on CPU.
Every number here is our choice (sized for 2 CPU cores)."""

import ml_collections

from pathor1_jax.train.defaults import base_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config("sft")
    config.model.init_from = "runs/demo/cpt"  # the CPT stage's run directory
    config.data.batch_size = 4
    config.data.max_len = 256
    config.data.max_images = 8
    config.data.max_patches = 128
    config.optim.lr = 2e-3
    config.optim.warmup_steps = 5
    config.optim.weight_decay = 0.01
    config.freeze = (r"^model\.visual\.",)  # vision tower frozen in SFT (as in the 3B/7B configs)
    config.train.steps = 40
    config.train.ckpt_every = 20
    config.train.out_dir = "runs/demo/sft"
    return config

"""`pathor1 demo` stage 1: continued pretraining of a tiny random-init Qwen2.5-VL on the embedded
image–caption pairs, on CPU. Every number here is our choice (sized for 2 CPU cores)."""

import ml_collections

from pathor1_jax.train.defaults import base_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config("cpt")
    config.data.batch_size = 4
    config.data.max_len = 128
    config.data.max_images = 8
    config.data.max_patches = 128  # 8 images of 56×56 px (16 patches each)
    config.optim.lr = 3e-3
    config.optim.warmup_steps = 5
    config.optim.weight_decay = 0.01
    config.train.steps = 40
    config.train.ckpt_every = 20
    config.train.out_dir = "runs/demo/cpt"
    return config

"""Patho-R1 stage 1 on Qwen2.5-VL-3B: continued pretraining on image–caption pairs (paper §3.2).

From the paper: the base model (Qwen2.5-VL-3B), the data (3.5 M image–text pairs: PubMed, Quilt,
PathGen and 0.7 M from textbooks, the same corpus as PathoCLIP) and that CPT comes first.
Everything else below is our choice (the paper gives no hyper-parameters), marked "ours".
`configs/cpt_7b.py` is the 7B variant.
"""

import ml_collections

from pathor1_jax.train.defaults import base_config

PAIRS = 3_500_000  # paper: CPT corpus size
PAIRS_PER_ROW = 3  # ours: measured order of magnitude, a packed 2048-token row holds ~3 pairs


def get_config(size: str = "3b") -> ml_collections.ConfigDict:
    config = base_config("cpt")
    config.model.preset = size
    config.model.init_from = f"checkpoints/Qwen2.5-VL-{size.upper()}-Instruct"  # HF folder to download
    config.model.dtype = "bfloat16"  # ours: bf16 compute, float32 master weights
    config.model.param_dtype = "float32"
    config.model.remat = "full"  # ours: each layer recomputed in the backward pass (fits v5e's 16 GiB)
    config.data.source = "data/cpt"  # ArrayRecord written by pathor1_jax.data.array_record
    config.data.format = "array_record"
    config.data.min_pixels = 56 * 56  # Qwen2.5-VL's default minimum
    config.data.max_pixels = 1280 * 28 * 28  # ours: ≤ 1280 visual tokens per image
    config.data.max_len = 2048  # ours
    config.data.batch_size = 8  # rows per process; ours
    config.data.max_images = 64  # ours
    config.data.max_patches = (
        8 * 2048 * 2
    )  # ours: half of the batch's tokens may be image tokens (4 patches each)
    config.data.worker_count = 8
    config.train.grad_accum = 8  # ours: 8 rows × 8 × 4 hosts (v5e-16) = 256 rows (~768 pairs) per step
    config.train.steps = PAIRS // (256 * PAIRS_PER_ROW)  # ours: one epoch ≈ 4557 steps
    config.train.ckpt_every = 500
    config.train.log_every = 10
    config.train.out_dir = f"runs/cpt_{size}"
    config.optim.lr = 2e-5  # ours
    config.optim.warmup_steps = 140  # ours: ~3 %
    config.optim.min_lr_ratio = 0.1
    config.optim.weight_decay = 0.0
    config.optim.clip_norm = 1.0
    # ours: the ViT (patch embedding and blocks) stays frozen; the merger and the LLM learn.
    config.freeze = (r"^model\.visual\.(patch_embed|blocks)\.",)
    config.mesh = dict(data=1, fsdp=-1, tensor=1)  # ours: FSDP over every chip (v5e-16 for 3B)
    config.sharding = dict(preset="fsdp", rules=())
    return config

"""Patho-R1 stage 2 on Qwen2.5-VL-3B: SFT on chain-of-thought chats (paper §3.3).

From the paper: it starts from the CPT model, on 500 k CoT samples over 5 subfields (histopathology,
gross, IHC, cytology, FISH), 3 difficulty levels and 4 task types, with answers as
`<think>…</think><answer>…</answer>`; it restores instruction following after CPT.
Everything else below is our choice (the paper gives no hyper-parameters), marked "ours".
"""

import ml_collections

from pathor1_jax.train.defaults import base_config

SAMPLES = 500_000  # paper: SFT corpus size
EPOCHS = 2  # ours
SAMPLES_PER_ROW = 3  # ours: a packed 4096-token row holds ~3 CoT chats with their image


def get_config(size: str = "3b") -> ml_collections.ConfigDict:
    config = base_config("sft")
    config.model.preset = size
    config.model.init_from = f"runs/cpt_{size}"  # the CPT run directory (its latest checkpoint)
    config.model.dtype = "bfloat16"  # ours: bf16 compute, float32 master weights
    config.model.param_dtype = "float32"
    config.model.remat = "full"  # ours: each layer recomputed in the backward pass (fits v5e's 16 GiB)
    config.data.source = "data/sft"  # ArrayRecord written by pathor1_jax.data.array_record
    config.data.format = "array_record"
    config.data.min_pixels = 56 * 56
    config.data.max_pixels = 1280 * 28 * 28  # ours
    config.data.max_len = 4096  # ours: long enough for hard-level CoTs
    config.data.batch_size = 4  # rows per process; ours
    config.data.max_images = 32  # ours
    config.data.max_patches = 4 * 4096 * 2  # ours: half of the batch's tokens may be image tokens
    config.data.overflow = "drop"  # ours: never train on a cut-off reasoning chain
    config.data.worker_count = 8
    config.train.grad_accum = 16  # ours: 4 rows × 16 × 4 hosts (v5e-16) = 256 rows (~768 chats) per step
    config.train.steps = SAMPLES * EPOCHS // (256 * SAMPLES_PER_ROW)  # ours: ≈ 1302 steps
    config.train.ckpt_every = 200
    config.train.log_every = 10
    config.train.out_dir = f"runs/sft_{size}"
    config.optim.lr = 1e-5  # ours
    config.optim.warmup_steps = 40  # ours: ~3 %
    config.optim.min_lr_ratio = 0.1
    config.optim.weight_decay = 0.0
    config.optim.clip_norm = 1.0
    config.freeze = (r"^model\.visual\.",)  # ours: the whole vision tower frozen in SFT
    config.mesh = dict(data=1, fsdp=-1, tensor=1)  # ours: FSDP over every chip (v5e-16 for 3B)
    config.sharding = dict(preset="fsdp", rules=())
    return config

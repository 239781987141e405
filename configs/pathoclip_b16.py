"""PathoCLIP-B: OpenAI CLIP ViT-B/16 trained in Patho-R1's two progressive stages (§3.2), for v5e-16.

    pathor1 train --config configs/pathoclip_b16.py:stage1
    pathor1 train --config configs/pathoclip_b16.py:stage2      # from stage I's run directory

From the paper: the backbone (OpenAI-CLIP-B), stage I on PathGen-1.6M (tissue-cell morphology),
stage II on PathGen-1.6M + Quilt-1M + PathCap + the textbook pairs (3.5 M) starting from stage I.
Everything else is our choice, marked "ours" (the paper's Appendix B.1 is not in the text we have).
`configs/pathoclip_l14.py` is the ViT-L/14 variant.
"""

import ml_collections

from pathor1_jax.train.clip_stage import base_clip_config

PAIRS = {"stage1": 1_600_000, "stage2": 3_500_000}  # paper: the two stages' corpora
GLOBAL_BATCH = 1024  # ours: pairs per contrastive batch (all of them negatives for each other)
HOSTS = 4  # v5e-16: 4 hosts of 4 chips


def get_config(stage: str = "stage1") -> ml_collections.ConfigDict:
    return pathoclip_config("ViT-B-16", "checkpoints/clip-vit-base-patch16", "pathoclip_b16", stage)


def pathoclip_config(preset: str, openai_weights: str, name: str, stage: str) -> ml_collections.ConfigDict:
    """Stage `stage` of PathoCLIP on CLIP `preset`: stage I from OpenAI's weights (`openai_weights`, a
    HF CLIPModel folder to download), stage II from stage I's run `runs/<name>/stage1`."""
    if stage not in PAIRS:
        raise ValueError(f"{name}.py:{stage}: expected one of {sorted(PAIRS)}")
    config = base_clip_config()
    config.model.preset = preset
    config.model.remat = "full"  # ours: each layer recomputed in the backward pass (1024 pairs on 16 GiB)
    config.model.init_from = openai_weights if stage == "stage1" else f"runs/{name}/stage1"
    config.data.source = f"data/pathoclip_{stage}.jsonl"  # caption records (pathor1_jax.data.records)
    config.data.batch_size = GLOBAL_BATCH // HOSTS  # pairs per process
    config.train.steps = PAIRS[stage] // GLOBAL_BATCH  # ours: one epoch per stage
    config.train.ckpt_every = 500
    config.train.log_every = 10
    config.train.out_dir = f"runs/{name}/{stage}"
    config.optim.lr = 1e-5 if stage == "stage1" else 5e-6  # ours: fine-tuning a pretrained CLIP
    config.optim.warmup_steps = 50  # ours
    config.optim.weight_decay = 0.1  # ours (OpenCLIP's)
    config.mesh = dict(data=1, fsdp=-1, tensor=1)  # ours: FSDP over the 16 chips
    config.sharding = dict(preset="fsdp", rules=())
    return config

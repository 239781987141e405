"""PathoCLIP's two-stage progressive training (§3.2) on the embedded data, tiny CLIP, CPU.

`configs/pathoclip_tiny.py:stage1` trains on the H&E tiles only (the morphology stage, PathGen-1.6M
in the paper); `:stage2` continues from stage I's run on all pairs (the 3.5M mixture in the paper):

    pathor1 train --config configs/pathoclip_tiny.py:stage1
    pathor1 train --config configs/pathoclip_tiny.py:stage2 --config.model.init_from=runs/pathoclip/stage1

Every number here is our choice (sized for 2 CPU cores).
"""

import ml_collections

from pathor1_jax.train.clip_stage import base_clip_config


def get_config(stage: str = "stage1") -> ml_collections.ConfigDict:
    if stage not in ("stage1", "stage2"):
        raise ValueError(f"pathoclip_tiny.py:{stage}: expected stage1 or stage2")
    config = base_clip_config()
    config.data.include = r"^he_" if stage == "stage1" else ""
    config.train.steps = 30
    config.train.out_dir = f"runs/pathoclip/{stage}"
    if stage == "stage2":
        config.model.init_from = "runs/pathoclip/stage1"
        config.optim.lr = 2e-4
    return config

"""PathoCLIP-L: `pathoclip_b16.py` on OpenAI CLIP ViT-L/14 (paper §3.2: OpenAI-CLIP-L; other numbers
ours), for v5e-16.

    pathor1 train --config configs/pathoclip_l14.py:stage1
    pathor1 train --config configs/pathoclip_l14.py:stage2      # from stage I's run directory
"""

import importlib.util
from pathlib import Path

import ml_collections

_spec = importlib.util.spec_from_file_location("pathoclip_b16", Path(__file__).with_name("pathoclip_b16.py"))
_b16 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_b16)


def get_config(stage: str = "stage1") -> ml_collections.ConfigDict:
    return _b16.pathoclip_config("ViT-L-14", "checkpoints/clip-vit-large-patch14", "pathoclip_l14", stage)

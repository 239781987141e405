"""Patho-R1 stage 1 on Qwen2.5-VL-7B: `cpt_3b.py` with the 7B model (paper §3.2; other numbers ours)."""

import importlib.util
from pathlib import Path

import ml_collections

_spec = importlib.util.spec_from_file_location("cpt_3b", Path(__file__).with_name("cpt_3b.py"))
_cpt_3b = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_cpt_3b)


def get_config() -> ml_collections.ConfigDict:
    config = _cpt_3b.get_config("7b")
    config.optim.lr = 1e-5  # ours: lower for the larger model
    config.train.grad_accum = 4  # ours: 8 rows × 4 × 8 hosts (v5p-64) = 256 rows per step, as 3B
    return config

"""Patho-R1 stage 2 on Qwen2.5-VL-7B: `sft_3b.py` with the 7B model (paper §3.3; other numbers ours)."""

import importlib.util
from pathlib import Path

import ml_collections

_spec = importlib.util.spec_from_file_location("sft_3b", Path(__file__).with_name("sft_3b.py"))
_sft_3b = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_sft_3b)


def get_config() -> ml_collections.ConfigDict:
    config = _sft_3b.get_config("7b")
    config.optim.lr = 5e-6  # ours: lower for the larger model
    config.train.grad_accum = 8  # ours: 4 rows × 8 × 8 hosts (v5p-64) = 256 rows per step, as 3B
    return config

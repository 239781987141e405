"""Supervised fine-tuning (Patho-R1 §3.3): next-token loss on the assistant turns of chain-of-thought
chats (`<think>…</think><answer>…</answer>`); system and user turns and image pads carry no loss.

`sft_step` is the jitted optimizer step (token-mean cross-entropy over labels != -100, see `lm.py`
and `step.py`).
"""

from __future__ import annotations

from pathor1_jax.train.lm import lm_nll
from pathor1_jax.train.step import jit_step

DATA_KIND = "chat"

sft_step = jit_step(lm_nll)

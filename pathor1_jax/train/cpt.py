"""Continued pretraining (Patho-R1 §3.2): next-token loss on the caption of image–caption pairs.

The data pipeline renders each pair as a one-turn chat (an instruction with the image, the caption
as the answer) and puts labels on the caption tokens only; `cpt_step` is the jitted optimizer step
(token-mean cross-entropy over labels != -100, see `lm.py` and `step.py`).
"""

from __future__ import annotations

from pathor1_jax.train.lm import lm_nll
from pathor1_jax.train.step import jit_step

DATA_KIND = "caption"

cpt_step = jit_step(lm_nll)

"""Shipped configs fit the TPU slice they are written for, as the real XLA TPU compiler says
(`pathor1 compile`'s path, over libtpu's deviceless topologies), at full depth: the layers are scanned,
so the program and its compile time do not grow with depth.

One TPU compile of a whole train step costs minutes of CPU here, so CI compiles the cells most at
risk (CI_CELLS); `bench/fit_table.py` compiles every shipped config on every slice of the README's
fit table through the same `compiler`."""

from __future__ import annotations

import pytest

from pathor1_jax.commands.compile import compiler
from pathor1_jax.sharding.topology import parse_topology
from pathor1_jax.train.config import load_config

pytestmark = pytest.mark.libtpu

CI_CELLS = {
    # PathoCLIP-L at 1024 pairs per contrastive batch: 64 pairs x 257 patches per v5e chip
    "pathoclip_l14.py": "v5e-16",
}


@pytest.mark.parametrize("config, topology", CI_CELLS.items())
def test_shipped_config_fits_its_slice(config, topology):
    # > 30 s: one TPU compile of the config's whole train step (~3 CPU-minutes; 17 wall-minutes under load)
    cfg = load_config(f"configs/{config}", [])
    report = compiler(cfg, parse_topology(topology))(cfg)
    assert report.fits, report.verdict()
    assert report.refused is None and report.temporaries > 0
    # the TPU flash kernel where the chip has one (the vision tower's 257 patches; CLIP's 77-token
    # captions are shorter than one block and stay XLA)
    assert "pallas_tpu" in report.attention, report.attention
    assert {"flash_attention_fwd", "flash_attention_dq", "flash_attention_dkv"} <= set(report.mosaic_kernels)

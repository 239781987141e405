"""Shipped configs fit the TPU slice they are written for, as the real XLA TPU compiler says
(`pathor1 compile`'s path, over libtpu's deviceless topologies), at full depth: the layers are scanned,
so the program and its compile time do not grow with depth.

What CI compiles, and what only the README's fit table proves (`bench/fit_table.py`, the same
`compiler`, every shipped config on v5e-16 / v5p-8 / v5p-64 / v6e-8):
- here, at real shapes: PathoCLIP-L at 1024 pairs on v5e-16 (CI_CELLS), the one TPU compile of the
  contrastive step in CI;
- the other code paths, compiled for a TPU in CI at tiny width (tests/test_compile_cli.py, v5e-8):
  the Qwen2.5-VL SFT train step with images (configs/demo_sft.py) and the GRPO policy update with
  the Mosaic policy loss (configs/grpo_tiny.py); their kernels at the 3B configs' shapes in
  tests/test_kernels_tpu_compile.py and tests/test_attention_tpu_compile.py;
- only in the README: every other (config, slice) cell — CPT/SFT/GRPO/DAPO 3B on v5e-16, the 7B
  configs on v5p-64, PathoCLIP-B, the other slices, `--max-batch`.
Why one cell: a cell costs 2.5-4.5 CPU-minutes whatever the depth (measured on this host: PathoCLIP-B
v5e-16 ~160-185 CPU-s, GRPO 3B 266 CPU-s), > 90% of it libtpu generating code per HLO instruction;
libtpu's start-up (~2 CPU-s) is already shared, all cells run in this one pytest process. The
file's CI budget (~4 min on two idle cores) holds one cell."""

from __future__ import annotations

import pytest

from pathor1_jax.commands.compile import compiler
from pathor1_jax.sharding.topology import parse_topology
from pathor1_jax.train.config import load_config

pytestmark = pytest.mark.libtpu

CI_CELLS = {
    # PathoCLIP-L at 1024 pairs per contrastive batch: 64 pairs x 257 patches per v5e chip (the
    # contrastive step is compiled for a TPU nowhere else in CI; the Qwen steps are, see above)
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

"""Shipped configs fit the TPU slice they are written for, as the real XLA TPU compiler says: the
user's own `pathor1 compile --config configs/<config> --topology <slice> --json` over libtpu's
deviceless topologies, at full depth (the layers are scanned: neither the program nor its compile time
grows with depth), one process per cell (`fit_cells`): started at collection, one at a time at nice 19
beside the rest of the suite (tests/conftest.py), two at a time once these tests, sorted last, wait.

CELLS lists every shipped config with its stated slice; CI compiles CI_CELLS, every kind of step and
both stated slices, each with the kernels the TPU runs (longest first: the order they start in):
- SFT 7B on v5p-64 and SFT 3B: the LM train step with images (16 micro-batches, flash attention in
  the decoder);
- GRPO 3B and DAPO 3B: the RL policy updates, the Mosaic policy loss per shard inside shard_map (DAPO:
  clip-higher and token aggregation instead of β·KL, no π_ref input: its own program);
- PathoCLIP-L at 1024 pairs: the contrastive step, flash attention in the vision tower.
`PATHOR1_FIT_CELLS=all pytest tests/test_shipped_configs_fit.py` compiles every cell (or a comma-separated
list of config names; `PATHOR1_FIT_WORKERS=1` on a shared host). The README's fit table
(`bench/fit_table.py`, the same command; it records each compile's CPU seconds) holds every slice.

Why not all ten in CI: a cell costs 220-350 CPU-seconds here (SFT 3B 263, GRPO 3B 293, PathoCLIP-L 220,
DAPO 3B 287, CPT 3B 328, SFT 7B on v5p-64 352: measured by this file on a loaded host), the same at
2 layers as at full depth (GRPO 3B: 213 vs 216 CPU-s compiling), because ~70% of it is libtpu
generating code for the program's ~460 fusions (81 in XLA's windowed-einsum loops for the
FSDP-sharded matmuls, ~60 the optimizer's per-parameter work), which grows with the slice's
device count, not the model's size (README: "What the program is made of"). These five compile on the
core the rest of the suite leaves idle (idle suite 1,216.9 s with them, 1,285.5 s with three: within
run-to-run spread); the other five would add ~14 idle minutes. They run the CI cells' code at other
shapes — CPT 3B is SFT's step, PathoCLIP-B is L's step, CPT/GRPO/DAPO 7B are the 3B steps wider on
v5p-64 — so only their fit, not their code, rests on the README table; at tiny width
tests/test_compile_cli.py also compiles the SFT step with images and the GRPO update for v5e-8.
"""

from __future__ import annotations

import os

import pytest
from fit_cells import start

pytestmark = pytest.mark.libtpu

FLASH_KERNELS = {"flash_attention_fwd", "flash_attention_dq", "flash_attention_dkv"}
RL_KERNELS = FLASH_KERNELS | {"token_logprobs_fwd", "token_logprobs_dh", "token_logprobs_dw"}
# config → (the slice it is written for, the Mosaic kernels its step must compile)
CELLS = {
    "sft_3b.py": ("v5e-16", FLASH_KERNELS),
    "grpo_3b.py": ("v5e-16", RL_KERNELS),
    "pathoclip_l14.py": ("v5e-16", FLASH_KERNELS),
    "cpt_3b.py": ("v5e-16", FLASH_KERNELS),
    "dapo_3b.py": ("v5e-16", RL_KERNELS),
    "pathoclip_b16.py": ("v5e-16", FLASH_KERNELS),
    "sft_7b.py": ("v5p-64", FLASH_KERNELS),
    "grpo_7b.py": ("v5p-64", RL_KERNELS),
    "cpt_7b.py": ("v5p-64", FLASH_KERNELS),
    "dapo_7b.py": ("v5p-64", RL_KERNELS),
}
CI_CELLS = ("sft_7b.py", "sft_3b.py", "grpo_3b.py", "dapo_3b.py", "pathoclip_l14.py")


def selected() -> list[str]:
    wanted = os.environ.get("PATHOR1_FIT_CELLS", "")
    if not wanted:
        return list(CI_CELLS)
    names = list(CELLS) if wanted == "all" else [w.removesuffix(".py") + ".py" for w in wanted.split(",")]
    unknown = sorted(set(names) - set(CELLS))
    if unknown:
        raise ValueError(f"PATHOR1_FIT_CELLS: unknown configs {unknown}; known: {sorted(CELLS)}")
    return names


@pytest.fixture(scope="module")
def pool():
    """All selected cells queued (conftest started them at collection); two compile at a time while
    the tests wait (PATHOR1_FIT_WORKERS=1 on a shared host)."""
    workers = int(os.environ.get("PATHOR1_FIT_WORKERS", "2"))
    return start([(config, CELLS[config][0]) for config in selected()], workers=workers)


@pytest.mark.parametrize("config", selected())
def test_shipped_config_fits_its_slice(pool, config):
    # > 30 s: TPU compiles of whole train steps, 3-6 CPU-minutes a cell (see the module docstring)
    topology, kernels = CELLS[config]
    cell = pool.result(config, topology)
    # the cost of a cell (pytest -rP shows it)
    print(f"{config} on {topology}: {cell.cpu_seconds:.0f} CPU-s, peak RSS {cell.max_rss_gib:.1f} GiB")
    assert cell.returncode == 0 and cell.report is not None, cell.describe()
    report = cell.report
    assert (report["topology"], report["fits"]) == (topology, True), cell.describe()
    per_device = report["per_device_bytes"]
    assert 0 < per_device["temporaries"] and per_device["total"] <= report["hbm_bytes"]
    # the TPU flash kernel where the chip has one: the decoder's rows and the vision towers (long
    # rows of windows beyond the kernel's VMEM budget run xla_blocked; CLIP's 77-token captions are
    # shorter than one block and stay XLA)
    assert "pallas_tpu" in report["attention"].split("+"), report["attention"]
    assert kernels <= set(cell.kernels), cell.kernels
    # the RL update's policy loss is the fused Mosaic kernel (per shard, inside shard_map)
    assert report["policy_loss"] == ("pallas" if "token_logprobs_fwd" in kernels else None)

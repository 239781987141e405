"""Shipped configs fit the TPU slice they are written for, as the real XLA TPU compiler says: the
user's own `pathor1 compile --config configs/<config> --topology <slice> --json` over libtpu's
deviceless topologies, at full depth (the layers are scanned: neither the program nor its compile time
grows with depth), one process per cell (`fit_cells`), for all ten stated cells, in two CI steps:

- `make test` (the suite) compiles SUITE_CELLS, one of each kind of step: SFT 3B (the LM train step
  with images, flash attention in the decoder and, block-sparse, in the vision tower), GRPO 3B (the RL
  policy update, the Mosaic policy loss per shard inside shard_map) and PathoCLIP-L at 1024 pairs (the
  contrastive step). They start at collection, one at a time at nice 19 beside the rest of the suite
  (tests/conftest.py), on the core the other tests leave idle, and are done before those are.
- `make long` (CI's second step, `PATHOR1_FIT_CELLS=rest`) compiles the other seven, two at a time:
  CPT 3B and DAPO 3B (DAPO: clip-higher and token aggregation instead of β·KL, no π_ref input: its own
  program), PathoCLIP-B, and CPT/SFT/GRPO/DAPO 7B on v5p-64.

Why two steps: a cell costs 220-360 CPU-seconds here (SFT 3B 263, GRPO 3B 293, PathoCLIP-L 220; CPT
3B 338, DAPO 3B 278, PathoCLIP-B 239, CPT/SFT/GRPO/DAPO 7B 361/260/261/251: measured by this file on a
loaded host), the same at
2 layers as at full depth (GRPO 3B: 213 vs 216 CPU-s compiling), because ~70% of it is libtpu
generating code for the program's ~460 fusions (81 in XLA's windowed-einsum loops for the
FSDP-sharded matmuls, ~60 the optimizer's per-parameter work), which grows with the slice's device
count, not the model's size (README: "What the program is made of"). All ten are ~2,800 CPU-s: inside
the suite they would take it from under 25 minutes to ~35; three fit on its idle core.

`PATHOR1_FIT_CELLS` selects the cells: unset, the suite's; `rest`, the other seven; `all`; or a
comma-separated list of config names. `PATHOR1_FIT_WORKERS` (default 2) compiles at a time once the
tests wait (1 on a shared host). The README's fit table (`bench/fit_table.py`, the same command; it
records each compile's CPU seconds) holds every slice.
"""

from __future__ import annotations

import os

import pytest
from fit_cells import start

pytestmark = pytest.mark.libtpu

FLASH_KERNELS = {"flash_attention_fwd", "flash_attention_dq", "flash_attention_dkv"}
RL_KERNELS = FLASH_KERNELS | {"token_logprobs_fwd", "token_logprobs_dh", "token_logprobs_dw"}
# config → (the slice it is written for, the Mosaic kernels its step must compile); longest first (the
# order they start in)
CELLS = {
    "grpo_7b.py": ("v5p-64", RL_KERNELS),
    "dapo_7b.py": ("v5p-64", RL_KERNELS),
    "sft_7b.py": ("v5p-64", FLASH_KERNELS),
    "cpt_7b.py": ("v5p-64", FLASH_KERNELS),
    "cpt_3b.py": ("v5e-16", FLASH_KERNELS),
    "grpo_3b.py": ("v5e-16", RL_KERNELS),
    "dapo_3b.py": ("v5e-16", RL_KERNELS),
    "sft_3b.py": ("v5e-16", FLASH_KERNELS),
    "pathoclip_l14.py": ("v5e-16", FLASH_KERNELS),
    "pathoclip_b16.py": ("v5e-16", FLASH_KERNELS),
}
SUITE_CELLS = ("grpo_3b.py", "sft_3b.py", "pathoclip_l14.py")


def selected() -> list[str]:
    wanted = os.environ.get("PATHOR1_FIT_CELLS", "")
    if not wanted:
        return list(SUITE_CELLS)
    if wanted in ("all", "rest"):
        return [config for config in CELLS if wanted == "all" or config not in SUITE_CELLS]
    names = [w.removesuffix(".py") + ".py" for w in wanted.split(",")]
    unknown = sorted(set(names) - set(CELLS))
    if unknown:
        raise ValueError(
            f"PATHOR1_FIT_CELLS: unknown configs {unknown}; known: {sorted(CELLS)}, or all, or rest"
        )
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

"""Per-device memory of the SFT 3B step's image path, compiled for a TPU slice (no TPU needed).

`configs/sft_3b.py` (4 rows x 4096 tokens and 32,768 image patches per host) at reduced depth: 2
decoder layers and 2 vision blocks (one window-attention block, one full-attention block), for the
topology given, compiled by `pathor1 compile`'s machinery (`train.aot.compile_step`). The patch count
per host varies so the table shows how the temporaries grow with it: linearly with block-sparse
vision attention, quadratically with one segment-masked attention over all patches.

    nice -n 10 python bench/vision_memory.py [--topology v5e-16] [--patches 8192 32768]
        [--attention auto xla]

One compile at a time (each 2-7 GiB RSS here, a few minutes on 2 loaded cores).
"""

from __future__ import annotations

import argparse
import time

import ml_collections

from pathor1_jax.models.qwen2_5_vl.presets import preset
from pathor1_jax.sharding.mesh import make_mesh
from pathor1_jax.sharding.rules import rules_from_config
from pathor1_jax.sharding.topology import parse_topology, topology_devices
from pathor1_jax.train.aot import compile_step
from pathor1_jax.train.config import load_config
from pathor1_jax.train.run import lm_aot_step

GIB = 2**30


def reduced_config(patches: int, attention: str, text_layers: int, vision_depth: int):
    config = load_config("configs/sft_3b.py")
    hf = preset("3b").to_hf_dict()
    hf["num_hidden_layers"] = hf["text_config"]["num_hidden_layers"] = text_layers
    vision = hf["vision_config"]
    vision["depth"], vision["fullatt_block_indexes"] = vision_depth, [vision_depth - 1]
    config.model.preset = ""
    with config.unlocked():
        config.model.hf_config = ml_collections.ConfigDict(hf)
    config.model.attention_impl = attention
    config.data.max_patches = patches
    config.train.grad_accum = 1
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", default="v5e-16")
    parser.add_argument("--patches", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--attention", nargs="+", default=["auto", "xla"])
    parser.add_argument("--text-layers", type=int, default=2)
    parser.add_argument("--vision-depth", type=int, default=2)
    args = parser.parse_args()
    topo = parse_topology(args.topology)
    rows = []
    for attention in args.attention:
        for patches in args.patches:
            config = reduced_config(patches, attention, args.text_layers, args.vision_depth)
            mesh = make_mesh(dict(config.mesh), topology_devices(topo))
            rules = rules_from_config(config.get("sharding"))
            start = time.perf_counter()
            report = compile_step(lm_aot_step(config, mesh, rules, topo.num_hosts), mesh, rules, topo)
            rows.append((attention, patches, report, time.perf_counter() - start))
            print(
                f"compiled {attention} ({report.attention}) {patches} in {rows[-1][3]:.0f}s: "
                f"temporaries {report.temporaries / GIB:.2f} GiB, total {report.total / GIB:.2f} GiB",
                flush=True,
            )
    print(
        f"\nSFT 3B step, {args.text_layers} decoder layers + {args.vision_depth} vision blocks, "
        f"{topo.name}, per device (GiB)"
    )
    print("| attention (traced) | patches/host | arguments | temporaries | total | fits |")
    print("|---|---:|---:|---:|---:|---|")
    for attention, patches, r, _ in rows:
        print(
            f"| {attention} ({r.attention}) | {patches} | {r.arguments / GIB:.2f} | "
            f"{r.temporaries / GIB:.2f} | {r.total / GIB:.2f} | {r.fits} |"
        )


if __name__ == "__main__":
    main()

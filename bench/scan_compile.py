"""Compile time and HLO size of the train step vs decoder depth, layers scanned vs unrolled.

The trainer's own step (`train.step.train_step`: token-mean NLL, gradients, AdamW) on a text batch,
lowered from abstract inputs (`train.step.abstract_state`: nothing is allocated) and compiled for
this host's CPU, or with `--topology v5e:2x2` by libtpu for a deviceless TPU topology. Only the
decoder depth changes; the vision tower keeps the preset's depth (frozen-free: its AdamW update is
part of the step). Compile-time growth with depth comes from the unrolled layers (and their
per-layer AdamW updates); scanned, the step holds one layer body whatever the depth.

    python bench/scan_compile.py                          # tiny widths, 2 / 8 / 36 layers
    python bench/scan_compile.py --preset 3b --layers 2,8 --seq 1024
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pathor1_jax.logical import use_rules
from pathor1_jax.models import qwen2_5_vl
from pathor1_jax.models.qwen2_5_vl.presets import preset
from pathor1_jax.sharding.mesh import make_mesh
from pathor1_jax.sharding.rules import fsdp
from pathor1_jax.train.defaults import base_config
from pathor1_jax.train.losses import per_token_nll, shifted_targets
from pathor1_jax.train.optim import make_optimizer
from pathor1_jax.train.step import StepSpec, abstract_state, train_step


def text_nll(model, micro: dict):
    hidden = model.hidden_states(
        micro["input_ids"], position_ids=micro["position_ids"], segment_ids=micro["segment_ids"]
    )
    targets, valid = shifted_targets(micro["labels"], micro["segment_ids"])
    return per_token_nll(hidden, model.logits, targets, 256), valid


def hlo_instructions(text: str) -> int:
    """Instructions in an HLO module's text (lines that define a value)."""
    return sum(1 for line in text.splitlines() if " = " in line and not line.lstrip().startswith("//"))


def measure(cfg, layers: int, scan: bool, mesh, batch: int, seq: int, remat: str) -> dict:
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_hidden_layers=layers))

    def make():
        return qwen2_5_vl.Qwen2_5_VLForConditionalGeneration(
            cfg, dtype=jnp.bfloat16, scan_layers=scan, remat=remat, rngs=nnx.Rngs(0)
        )

    rules = fsdp()
    tx, _ = make_optimizer(base_config("sft").optim, 100, ())
    graphdef, state = abstract_state(make, tx, mesh, rules)
    rows = NamedSharding(mesh, P(None, "fsdp"))

    def tokens(*shape):
        return jax.ShapeDtypeStruct(shape, jnp.int32, sharding=rows)

    micro = {
        "input_ids": tokens(1, batch, seq),
        "labels": tokens(1, batch, seq),
        "segment_ids": tokens(1, batch, seq),
        "position_ids": jax.ShapeDtypeStruct((1, 3, batch, seq), jnp.int32, sharding=rows.update(spec=P())),
    }
    step = jax.jit(lambda s, b: train_step(StepSpec(graphdef, tx), text_nll, s, b), donate_argnums=0)
    with jax.set_mesh(mesh), use_rules(mesh, rules):
        t0 = time.perf_counter()
        lowered = step.lower(state, micro)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
    return {
        "layers": layers,
        "scan": scan,
        "lower_s": t1 - t0,
        "compile_s": t2 - t1,
        "hlo": hlo_instructions(compiled.as_text()),
        "stablehlo_ops": hlo_instructions(lowered.as_text()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny", help="model widths: tiny, 3b, 7b")
    parser.add_argument("--layers", default="2,8,36", help="decoder depths, comma-separated")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--remat", default="none")
    parser.add_argument("--topology", help="compile for a deviceless TPU topology, e.g. v5e:2x2 (libtpu)")
    args = parser.parse_args()
    if args.topology:
        from jax.experimental import topologies

        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        devices = topologies.get_topology_desc(platform="tpu", topology_name=args.topology).devices
    else:
        devices = jax.devices()
    mesh = make_mesh({"fsdp": -1}, devices=devices)
    cfg = preset(args.preset)
    target = args.topology or f"{len(devices)} x {devices[0].platform}"
    print(f"jax {jax.__version__}; {args.preset} widths, batch {args.batch} x {args.seq} tokens, "
          f"remat {args.remat}; compiled for {target}")  # fmt: skip
    print("wall seconds on this host (shared and loaded: compare rows of one run only)\n")
    header = ("layers", "decoder", "lower s", "compile s", "HLO instructions", "StableHLO ops")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for layers in (int(n) for n in args.layers.split(",")):
        for scan in (False, True):
            r = measure(cfg, layers, scan, mesh, args.batch, args.seq, args.remat)
            kind = "scanned" if scan else "unrolled"
            print(f"| {layers} | {kind} | {r['lower_s']:.1f} | {r['compile_s']:.1f} | {r['hlo']:,} | "
                  f"{r['stablehlo_ops']:,} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

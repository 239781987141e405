"""`pathor1 compile --config F --topology v5e-16 [--slices N] [--json OUT] [--max-batch]`: compile the
config's training step for a Cloud TPU slice that is not here, and say whether it fits.

The stage's step (CPT/SFT train step, GRPO/DAPO policy update, PathoCLIP contrastive step: the
registry's `compile` hook) is built with the config's mesh, rules, batch, sequence length and image
budget over libtpu's abstract devices for the topology, and compiled by the real XLA TPU and Mosaic
compilers (`train.aot`). It prints per-device bytes (arguments, outputs, temporaries, total) against
the chip's usable HBM, FLOPs per step (analytic) and the compute-bound step time at the chip's peak
bf16 FLOP/s, the attention and policy-loss implementations compiled, the Mosaic kernels and
collectives in the program, and the compile time. Exit 0 when it fits, 1 when it does not (or the
compiler refuses it for memory), 2 for bad input (topology name, a mesh that does not divide the
slice, a rule or batch that does not divide a tensor).

`--max-batch` searches the largest per-process batch (the stage's `batch_key`, with `data.max_patches`
and `data.max_images` scaled along) that fits, compiling each candidate; `--json` then describes that
batch. `--config.key=value` overrides any key first (e.g. `--config.model.remat=full`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from pathor1_jax.errors import EXIT_OK, Pathor1Error, UserError
from pathor1_jax.flags import positive_int
from pathor1_jax.sharding.topology import TOPOLOGY_HELP

TAKES_OVERRIDES = True
SCALED_WITH_BATCH = ("data.max_patches", "data.max_images")  # per-batch budgets, per row unchanged


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="config file defining get_config() (path.py[:arg])")
    parser.add_argument("--topology", required=True, help=TOPOLOGY_HELP)
    parser.add_argument("--slices", type=positive_int, default=1, help="slices joined over DCN (default 1)")
    parser.add_argument("--json", help="write the report as JSON to this file")
    parser.add_argument(
        "--max-batch",
        action="store_true",
        help="search the largest per-process batch that fits (one compile per candidate)",
    )
    parser.epilog = "Any --config.<key>=<value> overrides that key of the config."


def _get(config, key: str):
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def _with_batch(config, key: str, value: int):
    """A copy of `config` with batch `key` = `value` and the per-batch budgets scaled along."""
    config = config.copy_and_resolve_references()
    old = int(_get(config, key))
    with config.unlocked():
        parent, _, leaf = key.rpartition(".")
        _get(config, parent)[leaf] = value
        if key == "data.batch_size":
            for scaled in SCALED_WITH_BATCH:
                block, _, name = scaled.rpartition(".")
                if name in _get(config, block) and _get(config, scaled):
                    _get(config, block)[name] = int(_get(config, scaled)) * value // old
    return config


def run(args: argparse.Namespace) -> int:
    from pathor1_jax import stages
    from pathor1_jax.outputs import check_writable_file
    from pathor1_jax.sharding.mesh import make_mesh
    from pathor1_jax.sharding.rules import rules_from_config
    from pathor1_jax.sharding.topology import parse_topology, topology_devices
    from pathor1_jax.train.aot import compile_step
    from pathor1_jax.train.config import load_config

    config = load_config(args.config, args.overrides)
    entry = stages.get(config.get("stage", ""))
    if entry.compile is None:
        raise UserError(f"stage {entry.name!r} has no ahead-of-time step to compile")
    topo = parse_topology(args.topology, args.slices)
    if args.json:
        check_writable_file(args.json, "--json")
    mesh = make_mesh(dict(config.mesh), topology_devices(topo))
    rules = rules_from_config(config.get("sharding"))
    build = stages.resolve(entry.compile)

    def compile_config(cfg):
        return compile_step(build(cfg, mesh, rules, topo.num_hosts), mesh, rules, topo)

    print(f"pathor1 compile: {args.config} ({entry.name}) for {topo.describe()}", flush=True)
    if args.max_batch:
        report, batch = max_batch(config, entry.batch_key, topo, compile_config)
        if report is None:
            raise Pathor1Error(f"does not fit: not even {entry.batch_key}={batch} fits on {topo.name}")
    else:
        report = compile_config(config)
    print(report.text())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.to_json(), f, indent=2)
            f.write("\n")
    if not report.fits:
        raise Pathor1Error(report.verdict())
    return EXIT_OK


def max_batch(config, key: str, topo, compile_config):
    """`(report, value)`: the largest value of batch `key` that fits (its report), searched by
    doubling from the config's value, then bisecting; `(None, smallest tried)` when none fits.
    Candidates are multiples of the smallest batch that splits evenly over the slice."""
    hosts = topo.num_hosts
    unit = topo.num_devices // math.gcd(topo.num_devices, hosts)  # per-host rows that fill every device
    start = max(unit, int(_get(config, key)) // unit * unit)
    tried: dict[int, object] = {}

    def fits(value: int) -> bool:
        if value not in tried:
            report = compile_config(_with_batch(config, key, value))
            tried[value] = report
            per_device = value * hosts / topo.num_devices
            verdict = "fits" if report.fits else "does not fit"
            print(
                f"  {key}={value} ({per_device:g} per device): {report.total / 2**30:.2f} GiB, {verdict} "
                f"({report.compile_seconds:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
        return tried[value].fits

    if not fits(start):
        low, high = 0, start
        if start == unit:
            return None, start
    else:
        low, high = start, None
        while high is None:
            if fits(low * 2):
                low *= 2
            else:
                high = low * 2
    while high - low > unit:  # bisect on multiples of `unit`
        mid = (low + high) // 2 // unit * unit
        if mid in (low, high):
            break
        if fits(mid):
            low = mid
        else:
            high = mid
    if low == 0:
        return None, unit
    return tried[low], low

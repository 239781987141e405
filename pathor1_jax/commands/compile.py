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


def compiler(config, topo):
    """`config → CompileReport` for configs of `config`'s stage, mesh and rules on `topo` (a
    `sharding.topology.Topology`): the stage's `compile` hook, compiled by `train.aot.compile_step`."""
    from pathor1_jax import stages
    from pathor1_jax.sharding.mesh import make_mesh
    from pathor1_jax.sharding.rules import rules_from_config
    from pathor1_jax.sharding.topology import topology_devices
    from pathor1_jax.train.aot import compile_step

    entry = stages.get(config.get("stage", ""))
    if entry.compile is None:
        raise UserError(f"stage {entry.name!r} has no ahead-of-time step to compile")
    mesh = make_mesh(dict(config.mesh), topology_devices(topo))
    rules = rules_from_config(config.get("sharding"))
    build = stages.resolve(entry.compile)
    return lambda cfg: compile_step(build(cfg, mesh, rules, topo.num_hosts), mesh, rules, topo)


def run(args: argparse.Namespace) -> int:
    from pathor1_jax import stages
    from pathor1_jax.outputs import check_writable_file
    from pathor1_jax.sharding.topology import parse_topology
    from pathor1_jax.train.config import load_config

    config = load_config(args.config, args.overrides)
    entry = stages.get(config.get("stage", ""))
    topo = parse_topology(args.topology, args.slices)
    if args.json:
        check_writable_file(args.json, "--json")
    compile_config = compiler(config, topo)
    print(f"pathor1 compile: {args.config} ({entry.name}) for {topo.describe()}", flush=True)
    if args.max_batch:
        report, batch = max_batch(config, entry.batch_key, topo, compile_config)
        if report is None:
            raise Pathor1Error(f"does not fit: not even {entry.batch_key}={batch} fits on {topo.name}")
    else:
        report = compile_config(config)
    print(report.text())
    if args.max_batch:
        per_device = rows_per_device(report)
        print(f"largest batch that fits: {entry.batch_key}={batch} ({per_device:g} rows per device)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.to_json(), f, indent=2)
            f.write("\n")
    if not report.fits:
        raise Pathor1Error(report.verdict())
    return EXIT_OK


def rows_per_device(report) -> float:
    """Rows (image–caption pairs for CLIP) each device processes per micro-batch."""
    shapes = report.shapes
    rows = shapes.get("rows", shapes.get("pairs", 0)) / shapes.get("micro-batches", 1)
    return rows / report.topology.num_devices


def _rows_per_unit(config, key: str, hosts: int) -> int:
    """Global rows one unit of batch `key` adds: a row per host for a per-process batch, a group of
    `rl.group_size` samples for RL's (global) mini-batch of groups."""
    return int(config.rl.group_size) if key == "rl.groups_per_minibatch" else hosts


def max_batch(config, key: str, topo, compile_config):
    """`(report, value)`: the largest value of batch `key` that fits (its report); `(None, smallest
    tried)` when none fits. Candidates are multiples of the smallest value whose rows split evenly
    over the slice. Memory grows linearly with the batch, so once two values fit the next candidate
    is where that line meets the chip's HBM (a compile that fits takes minutes, one that does not
    is refused in seconds); otherwise the search doubles, then bisects."""
    unit = topo.num_devices // math.gcd(topo.num_devices, _rows_per_unit(config, key, topo.num_hosts))
    start = max(unit, int(_get(config, key)) // unit * unit)
    tried: dict[int, object] = {}

    def fits(value: int) -> bool:
        if value not in tried:
            report = compile_config(_with_batch(config, key, value))
            tried[value] = report
            verdict = "fits" if report.fits else "does not fit"
            print(
                f"  {key}={value} ({rows_per_device(report):g} rows per device): {report.total / 2**30:.2f} "
                f"GiB, {verdict} ({report.compile_seconds:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
        return tried[value].fits

    def line() -> int | None:
        """Where the line through the two largest fitting batches meets the chip's HBM."""
        fitting = sorted(v for v, r in tried.items() if r.fits)
        if len(fitting) < 2:
            return None
        (v1, r1), (v2, r2) = ((v, tried[v]) for v in fitting[-2:])
        slope = (r2.total - r1.total) / (v2 - v1)
        return int(v2 + (r2.hbm_bytes - r2.total) / slope) // unit * unit if slope > 0 else None

    if not fits(start):
        low, high = 0, start
        while high > unit:
            candidate = max(unit, high // 2 // unit * unit)
            if fits(candidate):
                low = candidate
                break
            high = candidate
        if low == 0:
            return None, unit
    else:
        low, high = start, None
    aim = True  # follow the line until it misses once, then bisect
    while high is None or high - low > unit:
        guess = line() if aim else None
        if guess is None:
            guess = 2 * low if high is None else (low + high) // 2 // unit * unit
        candidate = max(low + unit, guess if high is None else min(guess, high - unit))
        if fits(candidate):
            low = candidate
        else:
            high, aim = candidate, candidate == low + unit
    return tried[low], low

"""The model options shared by `pathor1 serve` and `pathor1 eval vlm`, and the engine they build."""

from __future__ import annotations

import argparse

import jax.numpy as jnp

from pathor1_jax.errors import UserError
from pathor1_jax.serve.engine import Engine
from pathor1_jax.sharding.mesh import make_mesh, parse_mesh_arg
from pathor1_jax.sharding.rules import PRESETS, preset
from pathor1_jax.train.loading import load_for_inference

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def add_model_arguments(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    parser.add_argument("--model", required=required, help="HF checkpoint folder or training run directory")
    parser.add_argument("--mesh", default="fsdp=-1", help="mesh sizes, e.g. data=2,fsdp=4,tensor=1")
    parser.add_argument("--sharding", default="fsdp", choices=sorted(PRESETS), help="sharding rules preset")
    parser.add_argument(
        "--dtype", default="float32", choices=sorted(DTYPES), help="compute dtype (HF checkpoints)"
    )
    parser.add_argument("--max-batch", type=int, default=32, help="most sequences generated together")
    parser.add_argument(
        "--max-model-len", type=int, default=8192, help="prompt + new tokens of one sequence, at most"
    )
    parser.add_argument("--chunk", type=int, default=16, help="decode steps between host checks (streaming)")


def engine_from_args(args: argparse.Namespace) -> Engine:
    """Load `--model` onto the mesh and wrap it in an `Engine`; bad flags are `UserError`s."""
    for flag, value, least in (("--max-batch", args.max_batch, 1), ("--chunk", args.chunk, 1),
                               ("--max-model-len", args.max_model_len, 2)):  # fmt: skip
        if value < least:
            raise UserError(f"{flag} must be >= {least}, got {value}")
    try:
        mesh = make_mesh(parse_mesh_arg(args.mesh))
    except ValueError as e:
        raise UserError(f"--mesh {args.mesh}: {e}") from None
    rules = preset(args.sharding)
    model, processor = load_for_inference(args.model, mesh=mesh, rules=rules, dtype=DTYPES[args.dtype])
    return Engine(
        model,
        processor,
        mesh=mesh,
        rules=rules,
        max_batch=args.max_batch,
        max_model_len=args.max_model_len,
        chunk=args.chunk,
    )

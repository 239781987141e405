"""The KV-cache decode loop of the Qwen2.5-VL text decoder: memory traffic and time per new token.

The loop `generate` runs after the prefill (`generate._decode`: greedy, `--steps` new tokens a row,
none stopping), jitted with its state donated, decoder layers unrolled and scanned, from a cache of
`--cache` slots filled up to its last `--steps`. Printed per layout: XLA's "bytes accessed" of the
compiled loop (its cost analysis, which counts a while loop's body once: about one step plus what
runs once), the cache's own bytes (keys + values of all layers) and their ratio, the copies of
cache-sized buffers in the program, and on this host's CPU the wall time per step (median of 3
loops after the first). A step must read each layer's cache once (attention over the static-length
cache) and write one slot; more bytes than that mean it copies the cache. With `--topology v5e:2x2`
libtpu compiles the loop for one chip of a deviceless TPU (no timing).

    python bench/decode_step.py                  # tiny widths, 4 layers, batch 32, cache 2048, CPU
    python bench/decode_step.py --preset 3b --batch 16 --cache 4096 --dtype bfloat16 --topology v5e:2x2
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from pathor1_jax.models import qwen2_5_vl
from pathor1_jax.models.qwen2_5_vl import KVCache
from pathor1_jax.models.qwen2_5_vl.generate import DecodeState, _decode
from pathor1_jax.models.qwen2_5_vl.presets import preset

MIB = 2**20


def measure(cfg, scan: bool, batch: int, cache_len: int, steps: int, dtype, device) -> dict:
    model = qwen2_5_vl.Qwen2_5_VLForConditionalGeneration(
        cfg, dtype=dtype, param_dtype=dtype, scan_layers=scan, rngs=nnx.Rngs(0)
    )
    graphdef, params = nnx.split(model)

    def loop(params, state: DecodeState):  # greedy, no row ever stops: `steps` full decode steps
        return _decode(
            nnx.merge(graphdef, params), state, num_steps=steps, sample=False, nucleus=False,
            eos_token_id=-1, pad_token_id=0,
        )  # fmt: skip

    def start_state() -> DecodeState:  # the cache filled up to `steps` slots before its end
        cache = dataclasses.replace(
            KVCache.init(cfg.text, batch, cache_len, dtype),
            segment_ids=jnp.ones((batch, cache_len), jnp.int32),
            index=jnp.asarray(cache_len - steps, jnp.int32),
        )
        rows = jnp.zeros((batch,), jnp.float32)
        return DecodeState(
            logits=jnp.zeros((batch, cfg.text.vocab_size), jnp.float32),
            cache=cache,
            next_position=jnp.full((batch,), cache_len - steps, jnp.int32),
            step=jnp.zeros((), jnp.int32),
            finished=jnp.zeros((batch,), bool),
            limit=jnp.full((batch,), steps, jnp.int32),
            temperature=rows,
            top_p=rows + 1,
            key=jax.random.key(0),
        )

    state = jax.eval_shape(start_state)
    on = jax.sharding.SingleDeviceSharding(device or jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on), (params, state))
    compiled = jax.jit(loop, donate_argnums=1).lower(*abstract).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    layer_cache = ",".join(map(str, state.cache.keys.shape[1:])) + "]"  # one layer's keys or values
    out = {
        "bytes": float(cost.get("bytes accessed", float("nan"))),
        "cache": 2 * state.cache.keys.size * state.cache.keys.dtype.itemsize,
        "copies": sum(
            1
            for line in compiled.as_text().splitlines()
            if " copy(" in line and layer_cache in line.split("copy(")[0]
        ),
        "ms": None,
    }
    if device is None:
        times = []
        for i in range(4):
            live = start_state()
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(params, live))
            if i:
                times.append(time.perf_counter() - t0)
        out["ms"] = statistics.median(times) / steps * 1e3
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny", help="model widths: tiny, 3b, 7b")
    parser.add_argument("--layers", type=int, default=4, help="decoder depth")
    parser.add_argument("--batch", type=int, default=32, help="rows decoded together")
    parser.add_argument("--cache", type=int, default=2048, help="cache slots (prompt + new tokens)")
    parser.add_argument("--steps", type=int, default=64, help="decode steps in the loop")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--topology", help="compile for one chip of a deviceless TPU, e.g. v5e:2x2 (libtpu)")
    args = parser.parse_args()
    device = None
    if args.topology:
        from jax.experimental import topologies

        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        device = topologies.get_topology_desc(platform="tpu", topology_name=args.topology).devices[0]
    cfg = preset(args.preset)
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_hidden_layers=args.layers))
    dtype = jnp.dtype(args.dtype)
    target = args.topology or f"this host's {jax.devices()[0].platform}"
    print(f"jax {jax.__version__}; {args.preset} widths, {args.layers} layers, {args.dtype}; batch "
          f"{args.batch}, cache {args.cache} slots, {args.steps} steps; compiled for {target}\n")  # fmt: skip
    header = ("decoder", "bytes accessed MiB", "cache MiB", "ratio", "cache-sized copies", "ms / step")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for scan in (False, True):
        r = measure(cfg, scan, args.batch, args.cache, args.steps, dtype, device)
        ms = "–" if r["ms"] is None else f"{r['ms']:.1f}"
        print(f"| {'scanned' if scan else 'unrolled'} | {r['bytes'] / MIB:,.0f} | {r['cache'] / MIB:,.0f} | "
              f"{r['bytes'] / r['cache']:.2f} | {r['copies']} | {ms} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

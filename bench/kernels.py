"""Kernel benchmarks: flash attention (Pallas vs XLA) and the fused policy loss (tiled vs unfused).

On a GPU/TPU (compiled kernels): attention forward+backward at T in {1k, 4k, 8k, 16k}, 16 q heads,
2 kv heads, D=128, bf16, causal: median time, model TFLOP/s (7·H·T²·D per causal fwd+bwd, as
FlashAttention counts), the compiler's temporaries, and the kernel's gradients against xla's
(a cell that does not fit the device's memory prints OOM); policy loss at V=151,936, T=4096,
D=2048 (bf16 inputs), time and compiled peak memory (on a GPU `auto` is the chunked path: the
Pallas policy-loss kernels are Mosaic, TPU only). Without an accelerator it says so, times small
shapes (XLA vs Pallas interpret mode: interpreter timings say nothing about kernel speed), reports
the XLA:CPU compiler's memory estimate of the policy loss at the full shape (compiled, not run;
float32 there), and, with libtpu installed, compiles the policy loss for a TPU topology ahead of
time (`--topology`, default v5e:4x4 = v5e-16): per-device temporaries of xla / chunked / pallas at
the GRPO 3B shape (16 groups x 8 responses x 1024 tokens, D 2048, float32 and bfloat16 head, FSDP
rules), the Mosaic kernels compiled and the compile times.

    python bench/kernels.py [--iters 5] [--topology v5e:4x4]
    PYTHONPATH=. python bench/kernels.py --iters 20      # on a GPU host, from a source checkout
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import statistics
import time

import jax
import jax.numpy as jnp
import jaxlib

from pathor1_jax.kernels import policy_loss
from pathor1_jax.kernels.attention import attention


def timed_ms(fn, *args, iters: int) -> float:
    """Median wall time (ms) of `fn` (a compiled or jitted function) after one warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def memory_gib(compiled) -> tuple[float, float]:
    """(peak, temporaries) of a compiled program in GiB; peak = arguments + outputs + temporaries."""
    stats = compiled.memory_analysis()
    total = stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
    return (total - stats.alias_size_in_bytes) / 2**30, stats.temp_size_in_bytes / 2**30


def out_of_memory(error: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(error) or "out of memory" in str(error).lower()


def attention_step(impl: str):
    def loss(q, k, v):
        return jnp.sum(attention(q, k, v, causal=True, impl=impl).astype(jnp.float32))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def attention_cell(impl: str, q, k, v, iters: int):
    """(ms, temporaries GiB, (dq, dk, dv)) of one compiled fwd+bwd, or None when it does not fit."""
    try:
        compiled = attention_step(impl).lower(q, k, v).compile()
        ms = timed_ms(compiled, q, k, v, iters=iters)
        return ms, memory_gib(compiled)[1], compiled(q, k, v)[1]
    except jax.errors.JaxRuntimeError as e:
        if not out_of_memory(e):
            raise
        return None


def max_rel_err(x: jax.Array, ref: jax.Array) -> float:
    """Max absolute error relative to the reference's largest magnitude (float32)."""
    x, ref = x.astype(jnp.float32), ref.astype(jnp.float32)
    return float(jnp.max(jnp.abs(x - ref)) / jnp.max(jnp.abs(ref)))


def bench_attention(lengths, heads, kv_heads, head_dim, dtype, kernel: str, iters: int) -> None:
    print(
        f"\n## attention fwd+bwd, causal, B=1, H={heads}, K={kv_heads}, D={head_dim}, {jnp.dtype(dtype).name}"
    )
    print(
        f"| T | xla (ms) | {kernel} (ms) | speed-up | {kernel} TFLOP/s | temporaries xla / {kernel} (GiB) "
        "| grad err vs xla |"
    )
    print("|---|---|---|---|---|---|---|")
    for t in lengths:
        ks = jax.random.split(jax.random.key(0), 3)
        q = jax.random.normal(ks[0], (1, t, heads, head_dim), dtype)
        k = jax.random.normal(ks[1], (1, t, kv_heads, head_dim), dtype)
        v = jax.random.normal(ks[2], (1, t, kv_heads, head_dim), dtype)
        xla = attention_cell("xla", q, k, v, iters)
        pallas = attention_cell(kernel, q, k, v, iters)
        flops = 7 * heads * t * t * head_dim  # causal fwd (2 matmuls) + bwd (5), half the scores each
        xla_ms, xla_temp = ("OOM", "OOM") if xla is None else (f"{xla[0]:.2f}", f"{xla[1]:.2f}")
        if pallas is None:
            print(f"| {t} | {xla_ms} | OOM | - | - | {xla_temp} / OOM | - |")
            continue
        speedup = "-" if xla is None else f"{xla[0] / pallas[0]:.2f}x"
        err = "-" if xla is None else f"{max(map(max_rel_err, pallas[2], xla[2])):.1e}"
        print(
            f"| {t} | {xla_ms} | {pallas[0]:.2f} | {speedup} | {flops / pallas[0] / 1e9:.0f} | "
            f"{xla_temp} / {pallas[1]:.2f} | {err} |"
        )


def loss_step(impl: str):
    def loss(hidden, lm_head, tokens, old, advantages, mask):
        return policy_loss.clipped_policy_loss(
            hidden, lm_head, tokens, old, advantages, mask, eps_low=0.2, eps_high=0.28, impl=impl
        )[0]

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def loss_inputs(t: int, d: int, vocab: int, dtype):
    ks = jax.random.split(jax.random.key(0), 4)
    hidden = jax.random.normal(ks[0], (1, t, d), dtype)
    lm_head = (0.02 * jax.random.normal(ks[1], (d, vocab), jnp.float32)).astype(dtype)
    tokens = jax.random.randint(ks[2], (1, t), 0, vocab)
    old = -5.0 + 0.1 * jax.random.normal(ks[3], (1, t))
    return hidden, lm_head, tokens, old, jnp.ones((1,)), jnp.ones((1, t))


def bench_policy_loss(t, d, vocab, dtype, impls, iters: int, run: bool) -> None:
    mode = "time and compiled peak memory" if run else "compiled peak memory only (not run)"
    print(f"\n## policy loss fwd+bwd, T={t}, D={d}, V={vocab}, {jnp.dtype(dtype).name}: {mode}")
    print("| impl | time (ms) | peak (GiB) | peak / unfused | temporaries (GiB) | temp / unfused |")
    print("|---|---|---|---|---|---|")
    args = loss_inputs(t, d, vocab, dtype)
    compiled = {impl: loss_step(impl).lower(*args).compile() for impl in ("xla", *impls)}
    peak_xla, temp_xla = memory_gib(compiled["xla"])
    for impl in impls:
        peak, temp = memory_gib(compiled[impl])
        ms = f"{timed_ms(compiled[impl], *args, iters=iters):.2f}" if run else "-"
        print(f"| {impl} | {ms} | {peak:.3f} | {peak / peak_xla:.3f} | {temp:.3f} | {temp / temp_xla:.3f} |")


def tpu_aot_policy_loss(topology: str) -> None:
    """Per-device memory of the policy loss fwd+bwd compiled by libtpu for `topology` (no TPU)."""
    from jax.experimental import topologies
    from jax.sharding import NamedSharding

    from pathor1_jax.logical import logical_to_spec, use_rules
    from pathor1_jax.sharding.mesh import make_mesh
    from pathor1_jax.sharding.rules import preset

    devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    mesh, rules = make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, devices), preset("fsdp")
    b, r, d, vocab = 16 * 8, 1024, 2048, 151_936
    print(f"\n## policy loss fwd+bwd compiled for {topology} ({len(devices)} x {devices[0].device_kind}),")
    print(f"GRPO 3B mini-batch: {b} x {r} tokens ({b * r // len(devices)} rows per device), D={d}, V={vocab}")
    print("| head | impl | temporaries / device (GiB) | temp / xla | Mosaic kernels | compile (s) |")
    print("|---|---|---|---|---|---|")

    def sds(shape, dtype, axes):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, logical_to_spec(axes, rules)))

    for head in (jnp.float32, jnp.bfloat16):
        args = (
            sds((b, r, d), jnp.bfloat16, ("batch", "length", "embed")),
            sds((d, vocab), head, ("embed", "vocab")),
            sds((b, r), jnp.int32, ("batch", "length")),
            sds((b, r), jnp.float32, ("batch", "length")),
            sds((b,), jnp.float32, ("batch",)),
            sds((b, r), jnp.float32, ("batch", "length")),
        )
        temps = {}
        for impl in ("xla", "chunked", "pallas"):
            start = time.perf_counter()
            with jax.set_mesh(mesh), use_rules(mesh, rules):
                compiled = loss_step(impl).lower(*args).compile()
            seconds = time.perf_counter() - start
            temps[impl] = compiled.memory_analysis().temp_size_in_bytes
            kernels = sorted(set(re.findall(r"token_logprobs_(?:fwd|dh|dw)\b", compiled.as_text()))) or ["-"]
            print(
                f"| {jnp.dtype(head).name} | {impl} | {temps[impl] / 2**30:.3f} | "
                f"{temps[impl] / temps['xla']:.3f} | {', '.join(kernels)} | {seconds:.0f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--topology", default="v5e:4x4", help="TPU topology for the AOT table (CPU host)")
    args = parser.parse_args()
    backend = jax.default_backend()
    print(
        f"device: {jax.devices()[0].device_kind} ({backend}), jax {jax.__version__}, "
        f"jaxlib {jaxlib.__version__}, {time.strftime('%Y-%m-%d', time.gmtime())}"
    )
    if backend in ("gpu", "tpu"):
        kernel = "pallas_gpu" if backend == "gpu" else "pallas_tpu"
        bench_attention([1024, 4096, 8192, 16384], 16, 2, 128, jnp.bfloat16, kernel, args.iters)
        fused = "pallas" if backend == "tpu" else "chunked"
        bench_policy_loss(4096, 2048, 151_936, jnp.bfloat16, ["xla", fused], args.iters, run=True)
        return
    print("no accelerator present: Pallas runs interpreted; timings at small shapes (not kernel speed)")
    os.environ["PATHOR1_PALLAS_INTERPRET"] = "1"
    bench_attention([128, 256], 4, 2, 64, jnp.float32, "pallas_tpu", args.iters)
    bench_policy_loss(256, 128, 4096, jnp.float32, ["xla", "chunked", "pallas"], args.iters, run=True)
    # float32: XLA:CPU upcasts a bf16 lm_head to float32 for its dots, which would hide the tiling.
    bench_policy_loss(4096, 2048, 151_936, jnp.float32, ["xla", "chunked"], args.iters, run=False)
    if importlib.util.find_spec("libtpu") is None:
        print("\nlibtpu not installed: no TPU ahead-of-time table (pip install 'jax[tpu]')")
        return
    os.environ["PATHOR1_PALLAS_INTERPRET"] = "0"
    tpu_aot_policy_loss(args.topology)


if __name__ == "__main__":
    main()

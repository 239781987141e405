"""Kernel benchmarks: flash attention (Pallas vs XLA) and the fused policy loss (tiled vs unfused).

On a GPU/TPU: attention forward+backward at T in {1k, 4k, 8k, 16k}, 16 q heads, 2 kv heads, D=128,
bf16, causal; policy loss at V=151,936, T=4096, D=2048 (bf16 inputs), time and peak memory.
Without an accelerator it says so, times small shapes (XLA vs Pallas interpret mode: interpreter
timings say nothing about kernel speed), and reports the XLA compiler's memory estimate of the
policy loss at the full shape (compiled, not run; float32 there).

    python bench/kernels.py [--iters 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp

from pathor1_jax.kernels import policy_loss
from pathor1_jax.kernels.attention import attention


def timed_ms(fn, *args, iters: int) -> float:
    """Median wall time (ms) of a jitted call after one compile/warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def memory_gib(fn, *args) -> tuple[float, float]:
    """(peak, temporaries) of the compiled program in GiB; peak = arguments + outputs + temporaries."""
    stats = fn.lower(*args).compile().memory_analysis()
    total = stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
    return (total - stats.alias_size_in_bytes) / 2**30, stats.temp_size_in_bytes / 2**30


def attention_step(impl: str):
    def loss(q, k, v):
        return jnp.sum(attention(q, k, v, causal=True, impl=impl).astype(jnp.float32))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def bench_attention(lengths, heads, kv_heads, head_dim, dtype, kernel: str, iters: int) -> None:
    print(f"\n## attention fwd+bwd, causal, H={heads}, K={kv_heads}, D={head_dim}, {jnp.dtype(dtype).name}")
    print(f"| T | xla (ms) | {kernel} (ms) | speed-up |")
    print("|---|---|---|---|")
    for t in lengths:
        ks = jax.random.split(jax.random.key(0), 3)
        q = jax.random.normal(ks[0], (1, t, heads, head_dim), dtype)
        k = jax.random.normal(ks[1], (1, t, kv_heads, head_dim), dtype)
        v = jax.random.normal(ks[2], (1, t, kv_heads, head_dim), dtype)
        xla = timed_ms(attention_step("xla"), q, k, v, iters=iters)
        pallas = timed_ms(attention_step(kernel), q, k, v, iters=iters)
        print(f"| {t} | {xla:.2f} | {pallas:.2f} | {xla / pallas:.2f}x |")


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
    peak_xla, temp_xla = memory_gib(loss_step("xla"), *args)
    for impl in impls:
        peak, temp = memory_gib(loss_step(impl), *args)
        ms = f"{timed_ms(loss_step(impl), *args, iters=iters):.2f}" if run else "-"
        print(f"| {impl} | {ms} | {peak:.3f} | {peak / peak_xla:.3f} | {temp:.3f} | {temp / temp_xla:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()
    backend = jax.default_backend()
    print(f"device: {jax.devices()[0].device_kind} ({backend}), jax {jax.__version__}")
    if backend in ("gpu", "tpu"):
        kernel = "pallas_gpu" if backend == "gpu" else "pallas_tpu"
        bench_attention([1024, 4096, 8192, 16384], 16, 2, 128, jnp.bfloat16, kernel, args.iters)
        fused = "pallas" if backend == "tpu" else "chunked"
        bench_policy_loss(4096, 2048, 151_936, jnp.bfloat16, ["xla", fused], args.iters, run=True)
        return
    print("no accelerator present: interpret-mode timings at small shapes (not kernel speed)")
    os.environ["PATHOR1_PALLAS_INTERPRET"] = "1"
    bench_attention([128, 256], 4, 2, 64, jnp.float32, "pallas_tpu", args.iters)
    bench_policy_loss(256, 128, 4096, jnp.float32, ["xla", "chunked", "pallas"], args.iters, run=True)
    # float32: XLA:CPU upcasts a bf16 lm_head to float32 for its dots, which would hide the tiling.
    bench_policy_loss(4096, 2048, 151_936, jnp.float32, ["xla", "chunked"], args.iters, run=False)


if __name__ == "__main__":
    main()

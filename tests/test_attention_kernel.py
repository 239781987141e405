"""Pallas flash attention against the plain-jnp reference, and the dispatch: interpreted on any host,
compiled (Triton) on a GPU (`gpu` marker: `pytest -m gpu tests/test_attention_kernel.py` there)."""

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pathor1_jax.kernels import attention as attention_mod
from pathor1_jax.kernels.attention import attention, attention_reference, select_impl
from pathor1_jax.kernels.flash_attention import flash_attention

TOL = 1e-5
# Compiled on a GPU, against the XLA reference on the same GPU: float32 at "highest" precision
# (conftest; the Triton dots then run IEEE float32, not TF32) within 1e-4 of the largest magnitude
# (summation order over ~1k keys differs); bfloat16 inputs against the float32 reference within
# 2e-2 (output) / 3e-2 (gradients), as the interpreted bf16 test. A wrong mask or tile is >= 1e-2 off
# in float32.
GPU_TOL = {jnp.float32: (1e-4, 1e-4), jnp.bfloat16: (2e-2, 3e-2)}
# Asserts what `auto` does where JAX's default backend is the CPU (skipped on a GPU/TPU host).
cpu_host = pytest.mark.skipif("jax.default_backend() != 'cpu'", reason="asserts the CPU host's dispatch")


def max_rel_err(x: jax.Array, ref: jax.Array) -> float:
    """Max absolute error relative to the reference's largest magnitude."""
    return float(jnp.max(jnp.abs(x - ref)) / jnp.max(jnp.abs(ref)))


def qkvw(b, t, s, h, k, d, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    return (
        jax.random.normal(ks[0], (b, t, h, d)),
        jax.random.normal(ks[1], (b, s, k, d)),
        jax.random.normal(ks[2], (b, s, k, d)),
        jax.random.normal(ks[3], (b, t, h, d)),  # cotangent
    )


def packed(b, t, lengths):
    """Self segment ids `[b, t]`: segments 1, 2, ... of the given lengths, then padding (0)."""
    ids = np.zeros((b, t), np.int32)
    pos = 0
    for i, n in enumerate(lengths, start=1):
        ids[:, pos : pos + n] = i
        pos += n
    return jnp.asarray(ids)


def pair_ids(b, t, s):
    q = np.ones((b, t), np.int32)
    q[:, -3:] = 2
    kv = np.ones((b, s), np.int32)
    kv[:, :5] = 2
    kv[:, -4:] = 0  # keys no query attends
    return jnp.asarray(q), jnp.asarray(kv)


def all_padding_row(b, t):
    ids = np.array(packed(b, t, [9, 7]))
    ids[-1] = 0  # the last sequence is padding only
    return jnp.asarray(ids)


# (B, T, S, H, K, D, causal, segments, backend); blocks are 16 x 16.
CASES = {
    "gqa4/2-causal-packed-pad-tail": (1, 40, 40, 4, 2, 16, True, lambda: packed(1, 40, [17, 13]), "tpu"),
    "gqa8/1-full-padding-row": (2, 24, 24, 8, 1, 16, False, lambda: all_padding_row(2, 24), "gpu"),
    "gqa4/2-cross-pair-causal-offset": (1, 24, 40, 4, 2, 16, True, lambda: pair_ids(1, 24, 40), "gpu"),
    "mha-causal-no-segments-padded": (1, 20, 20, 2, 2, 16, True, lambda: None, "tpu"),
    "gqa8/1-exact-blocks-no-mask": (1, 32, 32, 8, 1, 32, False, lambda: None, "tpu"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_flash_attention_matches_reference(name):
    b, t, s, h, k, d, causal, make_ids, backend = CASES[name]
    q, kk, v, do = qkvw(b, t, s, h, k, d)
    ids = make_ids()

    def pallas(q, k, v):
        return flash_attention(
            q, k, v, segment_ids=ids, causal=causal, backend=backend, block_q=16, block_k=16, interpret=True
        )

    def reference(q, k, v):
        return attention_reference(q, k, v, segment_ids=ids, causal=causal)

    out, vjp = jax.vjp(pallas, q, kk, v)
    ref_out, ref_vjp = jax.vjp(reference, q, kk, v)
    assert out.shape == (b, t, h, d)
    assert max_rel_err(out, ref_out) <= TOL
    for grad, ref_grad, which in zip(vjp(do), ref_vjp(do), "qkv", strict=True):
        assert grad.shape == ref_grad.shape, which
        assert max_rel_err(grad, ref_grad) <= TOL, which


def test_block_sparse_kernel_matches_reference():
    """Block-sparse TPU kernel (interpreted): windows of <= 20 positions, padding runs in the middle
    and at the tail, T = 100 padded to 7 blocks of 16; each loop visits only its block range."""
    q, k, v, do = qkvw(2, 100, 100, 4, 2, 16, seed=3)
    rng = np.random.default_rng(0)
    ids = np.cumsum(rng.random((2, 100)) < 0.08, axis=1).astype(np.int32) + 1
    ids[:, 40:46] = 0
    ids[:, 93:] = 0
    ids = jnp.asarray(ids)

    def pallas(q, k, v):
        return flash_attention(
            q, k, v, segment_ids=ids, backend="tpu", block_q=16, block_k=16, interpret=True, block_sparse=True
        )

    out, vjp = jax.vjp(pallas, q, k, v)
    ref_out, ref_vjp = jax.vjp(lambda q, k, v: attention_reference(q, k, v, segment_ids=ids), q, k, v)
    assert max_rel_err(out, ref_out) <= TOL
    for grad, ref_grad, which in zip(vjp(do), ref_vjp(do), "qkv", strict=True):
        assert max_rel_err(grad, ref_grad) <= TOL, which
    with pytest.raises(ValueError, match="block_sparse needs self-attention segment_ids"):
        flash_attention(q, k, v, segment_ids=ids, causal=True, interpret=True, block_sparse=True)


def test_bfloat16_inputs_match_float32_reference():
    """bf16 q/k/v (probabilities cast to bf16 before P @ V, as on the accelerators) stay close."""
    q, k, v, do = qkvw(1, 40, 40, 4, 2, 16, seed=1)
    ids = packed(1, 40, [23, 12])
    bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v)]

    def pallas(q, k, v):
        return flash_attention(q, k, v, segment_ids=ids, causal=True, block_q=16, block_k=16, interpret=True)

    out, vjp = jax.vjp(pallas, *bf16)
    ref_out, ref_vjp = jax.vjp(
        lambda *a: attention_reference(*a, segment_ids=ids, causal=True),
        *(x.astype(jnp.float32) for x in bf16),
    )
    assert out.dtype == jnp.bfloat16
    assert max_rel_err(out.astype(jnp.float32), ref_out) <= 2e-2
    for grad, ref_grad in zip(vjp(do.astype(jnp.bfloat16)), ref_vjp(do), strict=True):
        assert grad.dtype == jnp.bfloat16
        assert max_rel_err(grad.astype(jnp.float32), ref_grad) <= 3e-2


def test_segments_change_the_result():
    """Guards the comparison above: the segment mask is really applied."""
    q, k, v, _ = qkvw(1, 16, 16, 2, 2, 16)
    ids = packed(1, 16, [8, 8])
    masked = flash_attention(q, k, v, segment_ids=ids, block_q=16, block_k=16, interpret=True)
    unmasked = flash_attention(q, k, v, block_q=16, block_k=16, interpret=True)
    assert max_rel_err(masked, unmasked) > 1e-2


@cpu_host
def test_auto_on_cpu_is_xla():
    q, k, v, _ = qkvw(1, 8, 8, 4, 2, 128)
    ids = packed(1, 8, [5])
    out = attention(q, k, v, segment_ids=ids, causal=True)
    np.testing.assert_array_equal(out, attention_reference(q, k, v, segment_ids=ids, causal=True))
    assert select_impl(4096, 4096, 128) == "xla"


def test_select_impl_per_backend_and_fallbacks(caplog, monkeypatch):
    monkeypatch.setattr(attention_mod, "_logged", set())
    assert select_impl(4096, 4096, 128, backend="tpu") == "pallas_tpu"
    assert select_impl(4096, 4096, 128, backend="gpu") == "pallas_gpu"
    assert select_impl(1000, 1000, 64, backend="gpu") == "pallas_gpu"  # padded to the block
    assert select_impl(4096, 4096, 80, backend="tpu") == "pallas_tpu"  # Qwen2.5-VL vision head dim
    with caplog.at_level(logging.WARNING, logger=attention_mod.__name__):
        assert select_impl(4096, 4096, 96, backend="tpu") == "xla"
        assert select_impl(4096, 4096, 96, backend="tpu") == "xla"
        assert select_impl(32, 32, 128, backend="gpu") == "xla"
        assert select_impl(16384, 16384, 128, backend="tpu") == "pallas_tpu"  # bf16: 20 MiB of VMEM
        assert select_impl(65536, 65536, 128, backend="tpu") == "xla"
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3  # each reason logged once
    assert "head_dim 96" in messages[0] and "shorter than one" in messages[1] and "VMEM" in messages[2]


@cpu_host
def test_auto_follows_the_platform_of_the_mesh_in_context():
    """`target_platform()`: the abstract mesh JAX tracks, then `use_rules`' mesh, then the backend."""
    from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh

    from pathor1_jax.kernels.platform import target_platform
    from pathor1_jax.logical import use_rules
    from pathor1_jax.sharding.mesh import make_mesh
    from pathor1_jax.sharding.rules import fsdp

    assert target_platform() == jax.default_backend() == "cpu"
    with use_rules(make_mesh({"fsdp": -1}), fsdp()):
        assert target_platform() == "cpu" and select_impl(4096, 4096, 128) == "xla"
    targets = (("cuda", "NVIDIA H100", "pallas_gpu"), ("tpu", "TPU v5 lite", "pallas_tpu"))
    for platform, kind, kernel in targets:
        device = AbstractDevice(device_kind=kind, num_cores=1, platform=platform)
        mesh = AbstractMesh((1,), ("fsdp",), axis_types=(AxisType.Explicit,), abstract_device=device)
        with use_abstract_mesh(mesh):
            assert select_impl(4096, 4096, 128) == kernel
            with use_rules(mesh, fsdp()):
                assert select_impl(4096, 4096, 128) == kernel
        with use_rules(mesh, fsdp()):  # a device-bearing mesh named only by the rules counts too
            assert select_impl(4096, 4096, 128) == kernel


def test_explicit_pallas_impl_uses_interpret_switch(monkeypatch):
    monkeypatch.setenv("PATHOR1_PALLAS_INTERPRET", "1")
    q, k, v, _ = qkvw(1, 8, 8, 2, 1, 16)
    ids = packed(1, 8, [3, 4])
    out = attention(q, k, v, segment_ids=ids, causal=True, impl="pallas_tpu")  # 8 tokens padded to 128
    ref = attention_reference(q, k, v, segment_ids=ids, causal=True)
    assert max_rel_err(out, ref) <= TOL


@cpu_host
def test_bad_inputs_raise():
    q, k, v, _ = qkvw(1, 8, 8, 3, 2, 16)
    with pytest.raises(ValueError, match="3 query heads are not a multiple of 2 kv heads"):
        flash_attention(q, k, v, interpret=True)
    with pytest.raises(ValueError, match="unknown impl 'flash'"):
        attention(q, k, v, impl="flash")
    with pytest.raises(ValueError, match="impl 'pallas_gpu' needs a GPU .* is 'cpu'"):
        attention(q, k, v, impl="pallas_gpu")
    q, k, v, _ = qkvw(1, 8, 12, 2, 2, 16)
    with pytest.raises(ValueError, match="self segment_ids need T == S"):
        flash_attention(q, k, v, segment_ids=jnp.zeros((1, 8), jnp.int32), interpret=True)


SHARDED = r"""
import os
os.environ["PATHOR1_PALLAS_INTERPRET"] = "1"
import jax, jax.numpy as jnp
jax.config.update("jax_default_matmul_precision", "highest")
from pathor1_jax.kernels.attention import attention, attention_reference
from pathor1_jax.logical import use_rules
from pathor1_jax.sharding.mesh import make_mesh
from pathor1_jax.sharding.rules import preset

ks = jax.random.split(jax.random.key(0), 4)
q = jax.random.normal(ks[0], (4, 24, 4, 16))
k = jax.random.normal(ks[1], (4, 24, 2, 16))
v = jax.random.normal(ks[2], (4, 24, 2, 16))
ids = jnp.where(jnp.arange(24) < 10, 1, 2)[None].repeat(4, 0).at[1, 20:].set(0)

def loss(impl, q, k, v):
    out = attention(q, k, v, segment_ids=ids, causal=True, impl=impl)
    return jnp.sum(out * jnp.cos(out)), out

mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
with use_rules(mesh, preset("fsdp_tp")):
    step = jax.jit(jax.value_and_grad(lambda *a: loss("pallas_tpu", *a), argnums=(0, 1, 2), has_aux=True))
    (_, out), grads = step(q, k, v)
    assert "shard_map" in str(jax.make_jaxpr(lambda *a: loss("pallas_tpu", *a))(q, k, v))
(_, ref), ref_grads = jax.value_and_grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
pairs = zip((out, *grads), (ref, *ref_grads))
errs = [float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in pairs]
print("max_rel_errs", errs)
assert max(errs) <= 1e-5, errs
"""


@pytest.mark.multidevice
def test_pallas_attention_under_mesh_runs_per_shard():
    """Inside `use_rules`, the kernel runs in shard_map (batch over data x fsdp, heads over tensor)."""
    from multidevice import run_on_8_devices

    assert "max_rel_errs" in run_on_8_devices(SHARDED)


def test_triton_kernels_lower_for_cuda():
    """The GPU path (fwd, dq, dk/dv; GQA, causal, packed segments) lowers to Triton custom calls for
    platform "cuda" on this CPU host (compiling them needs a GPU)."""
    from jax import export

    triton = "__gpu$xla.gpu.triton"

    def loss(q, k, v):
        ids = (jnp.arange(256) >= 100).astype(jnp.int32)[None]
        out = flash_attention(q, k, v, segment_ids=ids, causal=True, backend="gpu", block_q=64, block_k=64)
        return jnp.sum(out.astype(jnp.float32))

    args = [jax.ShapeDtypeStruct((1, 256, 8, 64), jnp.bfloat16)]
    args += [jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.bfloat16)] * 2
    exported = export.export(
        jax.jit(jax.grad(loss, argnums=(0, 1, 2))),
        platforms=("cuda",),
        disabled_checks=[export.DisabledSafetyCheck.custom_call(triton)],
    )(*args)
    module = exported.mlir_module()
    calls = [line for line in module.splitlines() if f"stablehlo.custom_call @{triton}" in line]
    names = sorted(re.search(r'name = "flash_attention_(\w+)"', line).group(1) for line in calls)
    assert exported.platforms == ("cuda",)
    assert names == ["dkv", "dq", "fwd"]


# ------------------------------------------------------------------------------ compiled on a GPU


def assert_vjp_close(fn, ref_fn, args, cotangent, dtype) -> None:
    """`fn` (bf16 or f32 inputs) against `ref_fn` on the float32 inputs: output and q/k/v gradients."""
    out_tol, grad_tol = GPU_TOL[dtype]
    cast = [x.astype(dtype) for x in args]
    out, grads = jax.jit(lambda *a: _value_and_vjp(fn, a, cotangent.astype(dtype)))(*cast)
    ref, ref_grads = jax.jit(lambda *a: _value_and_vjp(ref_fn, a, cotangent))(
        *(x.astype(jnp.float32) for x in cast)
    )
    assert out.dtype == dtype and max_rel_err(out.astype(jnp.float32), ref) <= out_tol
    for grad, ref_grad, which in zip(grads, ref_grads, "qkv", strict=True):
        assert grad.dtype == dtype, which
        assert max_rel_err(grad.astype(jnp.float32), ref_grad) <= grad_tol, which


def _value_and_vjp(fn, args, cotangent):
    out, vjp = jax.vjp(fn, *args)
    return out, vjp(cotangent)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", list(CASES))
def test_triton_kernels_compiled_match_reference(name, dtype):
    """The cases above (16 x 16 blocks, padded lengths, GQA, causal offsets, packed and padding-only
    rows), compiled by Triton for the GPU, forward and backward."""
    b, t, s, h, k, d, causal, make_ids, _ = CASES[name]
    q, kk, v, do = qkvw(b, t, s, h, k, d)
    ids = make_ids()

    def pallas(q, k, v):
        return flash_attention(q, k, v, segment_ids=ids, causal=causal, backend="gpu", block_q=16, block_k=16)

    def reference(q, k, v):
        return attention_reference(q, k, v, segment_ids=ids, causal=causal)

    assert_vjp_close(pallas, reference, (q, kk, v), do, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_auto_on_gpu_runs_the_triton_kernel(head_dim, dtype):
    """`attention(impl="auto")` on a GPU picks `pallas_gpu` (recorded while tracing; the compiled
    program holds the Triton kernels) at the real 64 x 64 blocks: T = 1000 (padded to 1024), GQA 8/2,
    causal, two packed documents and a padding tail; equal to xla forward and backward."""
    from pathor1_jax.kernels.platform import recording_impls

    q, k, v, do = qkvw(2, 1000, 1000, 8, 2, head_dim, seed=5)
    ids = packed(2, 1000, [600, 350])

    def auto(q, k, v):
        return attention(q, k, v, segment_ids=ids, causal=True)

    def reference(q, k, v):
        return attention(q, k, v, segment_ids=ids, causal=True, impl="xla")

    with recording_impls() as impls:
        hlo = (
            jax.jit(lambda *a: _value_and_vjp(auto, a, do.astype(dtype)))
            .lower(*(x.astype(dtype) for x in (q, k, v)))
            .as_text()
        )
    assert impls == {"attention": {"pallas_gpu"}}
    assert sorted(set(re.findall(r'name = "flash_attention_(\w+)"', hlo))) == ["dkv", "dq", "fwd"]
    assert_vjp_close(auto, reference, (q, k, v), do, dtype)


@pytest.mark.gpu
def test_qwen2_5_vl_forward_and_grad_on_gpu_auto_equals_xla():
    """The tiny Qwen2.5-VL (text decoder and vision tower, one 112 px image per row: 64 patches, 16
    image tokens; T = 96, the second row padded from position 80) on a GPU: `attention_impl="auto"`
    runs the Triton kernel in every attention, and its logits and parameter gradients equal the xla
    model's."""
    import dataclasses

    from flax import nnx

    from pathor1_jax.kernels.platform import recording_impls
    from pathor1_jax.models import qwen2_5_vl

    cfg = qwen2_5_vl.tiny_config(vocab_size=2048)
    cfg = dataclasses.replace(cfg, image_token_id=2000, vision_start_token_id=2002, vision_end_token_id=2003)
    b, t, grid = 2, 96, (1, 8, 8)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 1000, size=(b, t))
    ids[:, 1], ids[:, 2:18], ids[:, 18] = (
        cfg.vision_start_token_id,
        cfg.image_token_id,
        cfg.vision_end_token_id,
    )
    mask = np.ones((b, t), np.int32)
    mask[1, 80:] = 0
    pixels = rng.standard_normal((b * 64, cfg.vision.patch_dim)).astype(np.float32)
    types = (ids == cfg.image_token_id).astype(np.int32)
    prep = qwen2_5_vl.prepare_inputs(cfg, ids, mask, np.array([grid] * b), types, b * 64)

    def loss_and_grads(impl: str):
        model = qwen2_5_vl.Qwen2_5_VLForConditionalGeneration(cfg, rngs=nnx.Rngs(0), attention_impl=impl)
        graphdef, params = nnx.split(model, nnx.Param)

        def loss(p):
            logits = nnx.merge(graphdef, p)(
                ids,
                pixel_values=pixels,
                position_ids=prep["position_ids"],
                segment_ids=mask,
                vision_index=prep["vision_index"],
            )
            return jnp.mean(jnp.where(mask[..., None] == 1, jnp.tanh(logits), 0.0)), logits

        with recording_impls() as impls:
            (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return impls["attention"], logits, {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(grads)}

    auto_impls, logits, grads = loss_and_grads("auto")
    xla_impls, ref_logits, ref_grads = loss_and_grads("xla")
    assert auto_impls == {"pallas_gpu"} and xla_impls <= {"xla", "xla_blocked"}
    assert max_rel_err(logits, ref_logits) <= 1e-4
    assert grads.keys() == ref_grads.keys()
    for key, ref in ref_grads.items():
        assert np.max(np.abs(grads[key] - ref)) <= 1e-4 * max(np.max(np.abs(ref)), 1e-30), key

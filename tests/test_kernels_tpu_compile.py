"""Every Pallas TPU kernel compiled by Mosaic (libtpu's real compiler) on this CPU host.

Deviceless v5e / v6e topologies (`tests/tpu.py`) and `jit(...).lower(...).compile()` inside
`jax.set_mesh` run XLA:TPU and Mosaic exactly as on a TPU VM, so these tests prove what interpret
mode cannot: the kernels lower, fit the chip's scoped VMEM at the tiles they pick, and are what
`impl="auto"` compiles. Flash attention (forward, dq, dk/dv; GQA at head dim 128 and the vision
tower's head dim 80) at real shapes (3B text T=4096, one 448x448 image's 1024 patches) on v5e and
v6e, and at small shapes on v6e (v5e's small shapes: test_attention_tpu_compile.py); the fused
policy loss (forward, dh, dW) at a small shape and at the GRPO 3B per-chip shape (8 sequences x
1024 response tokens, D 2048, V 151,936) per shard on a 4-chip slice of both. Numerics stay in the
interpret-mode tests (test_attention_kernel.py, test_policy_loss.py).

The compiled programs are module-scoped fixtures (one attention program and two policy-loss
programs per chip), so each kernel is compiled once per chip and shape.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from tpu import tpu_devices, tpu_mesh

from pathor1_jax.kernels import policy_loss
from pathor1_jax.kernels.flash_attention import flash_attention
from pathor1_jax.logical import logical_to_spec, use_rules
from pathor1_jax.sharding.mesh import make_mesh
from pathor1_jax.sharding.rules import fsdp

pytestmark = pytest.mark.libtpu

CHIPS = ("v5e", "v6e")
ATTENTION = {  # name: (T, query heads, kv heads, head dim, causal)
    "text-3b": (4096, 16, 2, 128, True),  # Qwen2.5-VL-3B decoder layer, GQA 16/2
    "vision": (1024, 16, 16, 80, False),  # Qwen2.5-VL vision block on one 448x448 image
    "small-gqa": (256, 4, 2, 128, True),
    "small-d80": (256, 4, 4, 80, False),
}
ATTENTION_CASES = {"v5e": ("text-3b", "vision"), "v6e": tuple(ATTENTION)}
FLASH_KERNELS = ("flash_attention_dkv", "flash_attention_dq", "flash_attention_fwd")
LOSS_KERNELS = ("token_logprobs_dh", "token_logprobs_dw", "token_logprobs_fwd")
LOSS_SHAPES = {  # per chip: (sequences, response tokens, D, V, head dtype)
    "small": (1, 512, 256, 4096 + 384, jnp.float32),  # the last vocabulary chunk overlaps
    "grpo-3b": (8, 1024, 2048, 151_936, jnp.bfloat16),
}
LOSS_CHIPS = 4  # a 2x2 slice: the kernels run per shard in shard_map


def mosaic_kernels(compiled) -> list[str]:
    """The Pallas kernel name of each Mosaic custom call of a compiled executable, sorted."""
    lines = [line for line in compiled.as_text().splitlines() if '"tpu_custom_call"' in line]
    found = [re.search(r"(flash_attention|token_logprobs)_[a-z]+", line) for line in lines]
    return sorted(m.group(0) if m else "?" for m in found)


@pytest.fixture(scope="module", params=CHIPS)
def attention_compiled(request):
    """Forward + backward of this chip's ATTENTION cases (packed segments) in one program."""
    cases = [ATTENTION[name] for name in ATTENTION_CASES[request.param]]
    mesh = make_mesh({"fsdp": 1}, tpu_devices(f"{request.param}:2x2")[:1])

    def loss(*qkv):
        total = 0.0
        for i, (t, _, _, _, causal) in enumerate(cases):
            ids = (jnp.arange(t) >= t // 3).astype(jnp.int32)[None]
            out = flash_attention(*qkv[3 * i : 3 * i + 3], segment_ids=ids, causal=causal, backend="tpu")
            total = total + jnp.sum(out.astype(jnp.float32))
        return total

    args = []
    for t, heads, kv_heads, d, _ in cases:
        args += [jax.ShapeDtypeStruct((1, t, heads, d), jnp.bfloat16)]
        args += [jax.ShapeDtypeStruct((1, t, kv_heads, d), jnp.bfloat16)] * 2
    with jax.default_matmul_precision("default"), jax.set_mesh(mesh):
        grad = jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))
        return len(cases), grad.lower(*args).compile()


@functools.cache
def loss_compiled(chip: str, shape: str, impl: str):
    """value_and_grad of the clipped policy loss on a 2x2 slice with the fsdp rules."""
    b, r, d, v, head_dtype = LOSS_SHAPES[shape]
    mesh, rules = tpu_mesh(f"{chip}:2x2", {"fsdp": -1}), fsdp()

    def sds(shape, dtype, axes):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, logical_to_spec(axes, rules)))

    def loss(hidden, lm_head, tokens, old, advantages, mask):
        kwargs = dict(eps_low=0.2, eps_high=0.28, impl=impl)
        return policy_loss.clipped_policy_loss(hidden, lm_head, tokens, old, advantages, mask, **kwargs)[0]

    b *= LOSS_CHIPS
    rows = ("batch", "length")
    args = (
        sds((b, r, d), jnp.bfloat16, (*rows, "embed")),
        sds((d, v), head_dtype, ("embed", "vocab")),
        sds((b, r), jnp.int32, rows),
        sds((b, r), jnp.float32, rows),
        sds((b,), jnp.float32, ("batch",)),
        sds((b, r), jnp.float32, rows),
    )
    with jax.default_matmul_precision("default"), jax.set_mesh(mesh), use_rules(mesh, rules):
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile()


@pytest.mark.parametrize("shape", list(LOSS_SHAPES))
@pytest.mark.parametrize("chip", CHIPS)
def test_policy_loss_auto_compiles_its_pallas_kernels_per_shard(chip, shape):
    """`impl="auto"` under an abstract TPU mesh is the Pallas path: its three kernels compiled by
    Mosaic at the chip's tiles inside shard_map (no "cannot be automatically partitioned")."""
    assert mosaic_kernels(loss_compiled(chip, shape, "auto")) == list(LOSS_KERNELS)


def test_policy_loss_for_a_tpu_is_compiled_even_where_pallas_is_interpreted(monkeypatch):
    """`PATHOR1_PALLAS_INTERPRET=1` (CPU tests) interprets kernels only off a TPU target: for a TPU
    mesh the Mosaic kernels are still compiled (a fit cell started beside such a test inherited the
    variable and compiled the GRPO 3B step without them)."""
    monkeypatch.setenv("PATHOR1_PALLAS_INTERPRET", "1")
    assert mosaic_kernels(loss_compiled("v5e", "small", "auto")) == list(LOSS_KERNELS)


def test_policy_loss_temporaries_are_at_most_an_eighth_of_xla():
    """Per-device temporaries of the fused loss (fwd+bwd) at the GRPO 3B per-chip shape on v5e,
    from the compiler's memory analysis, against the unfused `impl="xla"` path on the same chip."""
    fused = loss_compiled("v5e", "grpo-3b", "auto").memory_analysis().temp_size_in_bytes
    unfused = loss_compiled("v5e", "grpo-3b", "xla").memory_analysis().temp_size_in_bytes
    assert 8 * fused <= unfused, (fused / 2**30, unfused / 2**30)


def test_flash_attention_compiles_with_mosaic(attention_compiled):
    """fwd, dq and dk/dv of every case (GQA, head dim 80; real T, and small T on v6e)."""
    cases, compiled = attention_compiled
    assert mosaic_kernels(compiled) == sorted(FLASH_KERNELS * cases)


def test_block_sparse_vision_attention_compiles_with_mosaic():
    """The vision tower's block-sparse kernels (block ranges read from SMEM, dynamic loop bounds):
    forward, dq and dk/dv at 4 images x 1024 patches in windows of 64, head dim 80, on v5e."""
    t, heads, d = 4096, 16, 80
    mesh = make_mesh({"fsdp": 1}, tpu_devices("v5e:2x2")[:1])
    ids = (jnp.arange(t) // 64 + 1).astype(jnp.int32)[None]

    def loss(q, k, v):
        out = flash_attention(q, k, v, segment_ids=ids, backend="tpu", block_sparse=True)
        return jnp.sum(out.astype(jnp.float32))

    spec = jax.ShapeDtypeStruct((1, t, heads, d), jnp.bfloat16)
    with jax.default_matmul_precision("default"), jax.set_mesh(mesh):
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(spec, spec, spec).compile()
    assert mosaic_kernels(compiled) == sorted(FLASH_KERNELS)


def test_long_head_dim_80_rows_get_the_scoped_vmem_they_need_on_v6e():
    """A vision tower's whole-row K/V at 65,536 patches, head dim 80, on v6e (configs/cpt_3b.py on
    v6e-8): VMEM pads head dim 80 to 128 lanes, so the kernel needs 64.25 MiB; the estimate it sets
    its scoped-VMEM limit from counted 80 and asked for 60 MiB (CompileTimeScopedVmemOom)."""
    t, heads, d = 65_536, 16, 80
    mesh = make_mesh({"fsdp": 1}, tpu_devices("v6e:2x4")[:1])
    spec = jax.ShapeDtypeStruct((1, t, heads, d), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((1, t), jnp.int32)

    def fwd(q, k, v, ids):
        return flash_attention(q, k, v, segment_ids=ids, backend="tpu", block_sparse=True)

    with jax.default_matmul_precision("default"), jax.set_mesh(mesh):
        compiled = jax.jit(fwd).lower(spec, spec, spec, ids).compile()
    assert mosaic_kernels(compiled) == ["flash_attention_fwd"]

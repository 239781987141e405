"""Every Pallas TPU kernel compiled by Mosaic (libtpu's real compiler) on this CPU host.

`jax.experimental.topologies` gives deviceless v5e / v6e chips; a jitted function lowered and
compiled inside `jax.set_mesh` over them runs XLA:TPU and Mosaic exactly as on a TPU VM, so these
tests prove what interpret mode cannot: that the kernels lower, fit the chip's scoped VMEM at the
tiles they pick, and are what `impl="auto"` compiles. Flash attention (forward, dq, dk/dv; GQA
at head dim 128 and the vision tower's head dim 80) and the fused policy loss (forward, dh, dW)
each at a small shape and at a real one (3B text T=4096, vision T=1024, and the GRPO 3B
per-chip policy-loss shape: 8 sequences x 1024 response tokens, D 2048, V 151,936). Numerics stay
in the interpret-mode tests (test_attention_kernel.py, test_policy_loss.py).

Compiled programs are module-scoped fixtures shared by the tests: one attention program and two
policy-loss programs per chip.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import pytest

pytest.importorskip("libtpu", reason="Mosaic compilation needs libtpu (pip install 'jax[tpu]')")

from jax.experimental import topologies  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from pathor1_jax.kernels import policy_loss  # noqa: E402
from pathor1_jax.kernels.flash_attention import flash_attention  # noqa: E402
from pathor1_jax.sharding.logical import logical_to_spec, use_rules  # noqa: E402
from pathor1_jax.sharding.mesh import make_mesh  # noqa: E402
from pathor1_jax.sharding.rules import preset  # noqa: E402

pytestmark = pytest.mark.libtpu

CHIPS = ("v5e", "v6e")
ATTENTION = {  # name: (T, query heads, kv heads, head dim, causal)
    "small-gqa": (256, 4, 2, 128, True),
    "small-d80": (256, 4, 4, 80, False),
    "text-3b": (4096, 16, 2, 128, True),  # Qwen2.5-VL-3B decoder, GQA 16/2
    "vision": (1024, 16, 16, 80, False),  # one 448x448 image: 1024 patches, head dim 80
}
FLASH_KERNELS = ("flash_attention_fwd", "flash_attention_dq", "flash_attention_dkv")
LOSS_KERNELS = ("token_logprobs_fwd", "token_logprobs_dh", "token_logprobs_dw")
# (sequences, response tokens, D, V, head dtype); "real" = GRPO 3B per chip (v5e-16: 8 x 1024 rows).
LOSS_SHAPES = {
    "small": (2, 256, 256, 4096 + 384, jnp.float32),
    "real": (8, 1024, 2048, 151_936, jnp.bfloat16),
}
LOSS_DEVICES = 4  # the loss programs run on a 2x2 slice, per shard in shard_map


def kernel_names(hlo: str) -> list[str]:
    """The Pallas kernel of each Mosaic custom call in a compiled HLO module ("?" if unnamed)."""
    calls = [line for line in hlo.splitlines() if 'custom_call_target="tpu_custom_call"' in line]
    return [
        m.group(0) if (m := re.search(r"(flash_attention|token_logprobs)_[a-z]+", c)) else "?" for c in calls
    ]


def chip_devices(chip: str, count: int):
    return topologies.get_topology_desc(platform="tpu", topology_name=f"{chip}:2x2").devices[:count]


@pytest.fixture(scope="module", params=CHIPS)
def attention_program(request):
    """One program: forward + backward of every ATTENTION case on one chip."""
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, chip_devices(request.param, 1))

    def loss(*qkv):
        total = 0.0
        for i, (t, _, _, _, causal) in enumerate(ATTENTION.values()):
            q, k, v = qkv[3 * i : 3 * i + 3]
            ids = (jnp.arange(t) >= t // 3).astype(jnp.int32)[None]  # two packed segments
            out = flash_attention(q, k, v, segment_ids=ids, causal=causal, backend="tpu")
            total = total + jnp.sum(out.astype(jnp.float32))
        return total

    args = []
    for t, h, kv, d, _ in ATTENTION.values():
        args += [jax.ShapeDtypeStruct((1, t, h, d), jnp.bfloat16)]
        args += [jax.ShapeDtypeStruct((1, t, kv, d), jnp.bfloat16)] * 2
    with jax.set_mesh(mesh):
        grad = jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))
        return request.param, grad.lower(*args).compile().as_text()


@functools.cache
def loss_program(chip: str, shape: str, impl: str):
    """value_and_grad of the clipped policy loss over a 2x2 slice with the fsdp rules."""
    b, r, d, v, head_dtype = LOSS_SHAPES[shape]
    b *= LOSS_DEVICES
    mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, chip_devices(chip, LOSS_DEVICES))
    rules = preset("fsdp")

    def sds(shape, dtype, axes):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, logical_to_spec(axes, rules)))

    def loss(hidden, lm_head, tokens, old, advantages, mask):
        kwargs = dict(eps_low=0.2, eps_high=0.28, impl=impl)
        return policy_loss.clipped_policy_loss(hidden, lm_head, tokens, old, advantages, mask, **kwargs)[0]

    rows = ("batch", "length")
    args = (
        sds((b, r, d), jnp.bfloat16, (*rows, "embed")),
        sds((d, v), head_dtype, ("embed", "vocab")),
        sds((b, r), jnp.int32, rows),
        sds((b, r), jnp.float32, rows),
        sds((b,), jnp.float32, ("batch",)),
        sds((b, r), jnp.float32, rows),
    )
    with jax.set_mesh(mesh), use_rules(mesh, rules):
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile()


@pytest.fixture(scope="module", params=[(chip, shape) for chip in CHIPS for shape in LOSS_SHAPES])
def loss_compiled(request):
    chip, shape = request.param
    return chip, shape, loss_program(chip, shape, "auto")


def test_flash_attention_compiles_with_mosaic(attention_program):
    """fwd, dq and dk/dv of all four cases (GQA, head dim 80, small and real T) are Mosaic kernels."""
    _, hlo = attention_program
    names = kernel_names(hlo)
    assert sorted(names) == sorted(FLASH_KERNELS * len(ATTENTION))


def test_policy_loss_auto_compiles_pallas_per_shard(loss_compiled):
    """`impl="auto"` under an abstract TPU mesh is the Pallas path: its three kernels, compiled by
    Mosaic at the chip's tiles, inside shard_map (no "cannot be automatically partitioned")."""
    _, _, compiled = loss_compiled
    assert sorted(kernel_names(compiled.as_text())) == sorted(LOSS_KERNELS)


def test_policy_loss_temporaries_are_an_eighth_of_xla():
    """Per-device XLA temporaries of the fused loss (fwd+bwd) at the GRPO 3B per-chip shape on
    v5e are at most 1/8 of the unfused `impl="xla"` path compiled for the same chip."""
    fused = loss_program("v5e", "real", "auto").memory_analysis().temp_size_in_bytes
    unfused = loss_program("v5e", "real", "xla").memory_analysis().temp_size_in_bytes
    assert fused * 8 <= unfused, (fused / 2**30, unfused / 2**30)

"""`attention(impl="auto")` compiled for a deviceless v5e topology from this CPU host: the dispatch
reads the mesh's TPU devices (not the CPU backend) and Mosaic compiles the flash kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tpu import mosaic_calls, tpu_mesh

from pathor1_jax.kernels.attention import attention
from pathor1_jax.kernels.platform import target_platform
from pathor1_jax.logical import use_rules
from pathor1_jax.sharding.rules import fsdp

pytestmark = pytest.mark.libtpu


def test_target_platform_of_a_topology_mesh_is_tpu():
    mesh = tpu_mesh("v5e:2x2", {"fsdp": -1})
    assert jax.default_backend() == "cpu"
    with jax.set_mesh(mesh):
        assert target_platform() == "tpu"
    with use_rules(mesh, fsdp()):
        assert target_platform() == "tpu"


@pytest.mark.parametrize("head_dim", [128, 80, 64])  # Qwen2.5-VL text, Qwen2.5-VL vision, CLIP
def test_auto_attention_compiles_mosaic_kernels_for_v5e(head_dim):
    """Forward + backward of causal GQA attention with packed segments, batch split over 4 chips
    (the kernel runs per shard in shard_map): 3 Mosaic kernels (forward, dq, dk/dv), no XLA
    softmax fallback."""
    mesh = tpu_mesh("v5e:2x2", {"fsdp": -1})
    batch = NamedSharding(mesh, P("fsdp"))
    q = jax.ShapeDtypeStruct((4, 256, 4, head_dim), jnp.bfloat16, sharding=batch)
    kv = jax.ShapeDtypeStruct((4, 256, 2, head_dim), jnp.bfloat16, sharding=batch)
    ids = jax.ShapeDtypeStruct((4, 256), jnp.int32, sharding=batch)

    def loss(q, k, v, ids):
        out = attention(q, k, v, segment_ids=ids, causal=True)  # impl="auto"
        return jnp.sum(out.astype(jnp.float32) ** 2)

    # conftest's float32 "highest" matmul precision is not valid for bf16 matmuls in Mosaic
    with jax.default_matmul_precision("default"), jax.set_mesh(mesh), use_rules(mesh, fsdp()):
        lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, ids)
        compiled = lowered.compile()
    assert mosaic_calls(compiled) == 3, compiled.as_text()[:2000]

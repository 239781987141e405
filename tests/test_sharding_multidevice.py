"""Sharded creation, safetensors loading and global batches on 8 fake CPU devices (one subprocess)."""

from __future__ import annotations

import pytest
from multidevice import run_on_8_devices

pytestmark = pytest.mark.multidevice

TOY = r'''
import json, tempfile
from pathlib import Path
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from safetensors.numpy import save_file
from pathor1_jax.models.layers import Embed, Linear, RMSNorm
from pathor1_jax.sharding.logical import logical_to_spec
from pathor1_jax.sharding.mesh import make_mesh
from pathor1_jax.sharding.multihost import batch_spec, make_global_batch, is_main_process
from pathor1_jax.sharding.params import create_sharded, logical_axes, shard_model
from pathor1_jax.sharding.rules import preset
from pathor1_jax.sharding.safetensors_load import Source, load_sharded

assert jax.device_count() == 8 and is_main_process()

class Toy(nnx.Module):
    def __init__(self, rngs):
        self.embed = Embed(64, 16, rngs=rngs)
        self.up = Linear(16, 32, use_bias=True, axes=("embed", "mlp"), rngs=rngs)
        self.down = Linear(32, 16, use_bias=False, axes=("mlp", "embed"), rngs=rngs)
        self.norm = RMSNorm(16, eps=1e-6, axis="embed", rngs=rngs)

reference = Toy(nnx.Rngs(0))
ref = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(reference))}
meshes = [({"data": 2, "fsdp": 2, "tensor": 2}, "fsdp_tp"), ({"fsdp": 8}, "fsdp"), ({"data": 8}, "dp")]
for mesh_cfg, name in meshes:
    mesh, rules = make_mesh(mesh_cfg), preset(name)
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 3
    created = create_sharded(lambda: Toy(nnx.Rngs(0)), mesh, rules)
    for model in (created, shard_model(Toy(nnx.Rngs(0)), mesh, rules)):
        for p, v in nnx.to_flat_state(nnx.state(model)):
            key, x = ".".join(map(str, p)), v.get_value()
            expected = NamedSharding(mesh, logical_to_spec(logical_axes(v), rules))
            assert x.sharding.is_equivalent_to(expected, x.ndim), (name, key, x.sharding, expected)
            np.testing.assert_allclose(np.asarray(x), ref[key], rtol=0, atol=1e-7, err_msg=key)
    flat = nnx.to_flat_state(nnx.state(created))
    specs = {".".join(map(str, p)): str(v.get_value().sharding.spec) for p, v in flat}
    print("created", name, specs)

# global batch: this process's rows, laid out by the rules' batch axis
mesh, rules = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}), preset("fsdp_tp")
local = {"ids": np.arange(8 * 3).reshape(8, 3), "mask": np.ones((8, 3), bool)}
batch = make_global_batch(local, mesh, batch_spec(rules))
assert batch["ids"].shape == (8, 3) and batch["ids"].sharding.spec == P(("data", "fsdp"))
np.testing.assert_array_equal(np.asarray(batch["ids"]), local["ids"])
assert {tuple(s.data.shape) for s in batch["ids"].addressable_shards} == {(2, 3)}

# safetensors, two files + index; PyTorch [out, in] kernels, an fp16 table, a transform
tmp = Path(tempfile.mkdtemp())
hf = {
    "embed.weight": ref["embed.embedding"].astype(np.float16),
    "up.weight": np.ascontiguousarray(ref["up.kernel"].T), "up.bias": ref["up.bias"],
    "down.weight": np.ascontiguousarray(ref["down.kernel"].T),
    "norm.weight_minus_one": ref["norm.weight"] - 1.0,
}
save_file({k: hf[k] for k in ("embed.weight", "up.weight")}, str(tmp / "a.safetensors"))
save_file({k: hf[k] for k in ("up.bias", "down.weight", "norm.weight_minus_one")}, str(tmp / "b.safetensors"))
weight_map = {k: "a.safetensors" if k in ("embed.weight", "up.weight") else "b.safetensors" for k in hf}
(tmp / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
sources = {
    "embed.embedding": "embed.weight",
    "up.kernel": Source("up.weight", perm=(1, 0)), "up.bias": "up.bias",
    "down.kernel": Source("down.weight", perm=(1, 0)),
    "norm.weight": Source("norm.weight_minus_one", transform=lambda x: x + 1.0),
}
import pathor1_jax.sharding.safetensors_load as sl
reads = []
original_read = sl.CheckpointReader.read
def counting_read(self, name, index=None):
    out = original_read(self, name, index)
    reads.append((name, out.shape))
    return out
sl.CheckpointReader.read = counting_read
loaded = load_sharded(lambda: Toy(nnx.Rngs(1)), tmp, sources, mesh, rules)
for p, v in nnx.to_flat_state(nnx.state(loaded)):
    key, x = ".".join(map(str, p)), v.get_value()
    assert x.dtype == jnp.float32
    expected = NamedSharding(mesh, logical_to_spec(logical_axes(v), rules))
    assert x.sharding.is_equivalent_to(expected, x.ndim), key
    tol = 1e-3 if key == "embed.embedding" else 0
    np.testing.assert_allclose(np.asarray(x), ref[key], rtol=tol, atol=1e-6, err_msg=key)
# sliced reads: up.weight [32, 16] split (tensor, fsdp) is read in [16, 8] pieces, never whole
assert {s for n, s in reads if n == "up.weight"} == {(16, 8)}, reads
assert {s for n, s in reads if n == "norm.weight_minus_one"} == {(16,)}
try:
    partial = {k: v for k, v in sources.items() if k != "down.kernel"}
    load_sharded(lambda: Toy(nnx.Rngs(1)), tmp, partial, mesh, rules)
    raise SystemExit("missing source not reported")
except KeyError as e:
    assert "parameter down.kernel: no checkpoint tensor is mapped to it" in str(e), e
try:
    load_sharded(lambda: Toy(nnx.Rngs(1)), tmp, {**sources, "down.kernel": "down.weight"}, mesh, rules)
    raise SystemExit("shape mismatch not reported")
except ValueError as e:
    assert "parameter down.kernel: checkpoint tensor 'down.weight' gives shape (16, 32)" in str(e), e
print("OK")
'''


def test_toy_sharded_creation_loading_and_batches_on_8_devices():
    out = run_on_8_devices(TOY, timeout=300)
    assert out.strip().endswith("OK"), out
    assert "created fsdp_tp {'down.kernel': \"P('tensor', 'fsdp')\"" in out, out
    assert "created fsdp {'down.kernel': \"P(None, 'fsdp')\"" in out, out

"""Sharded creation, safetensors loading and global batches on 8 fake CPU devices (one subprocess)."""

from __future__ import annotations

import pytest
from multidevice import run_on_8_devices

pytestmark = pytest.mark.multidevice

TOY = r"""
import json, tempfile
from pathlib import Path
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from safetensors.numpy import save_file
from pathor1_jax.models.layers import Embed, Linear, RMSNorm
from pathor1_jax.logical import logical_to_spec
from pathor1_jax.sharding.mesh import make_mesh
from pathor1_jax.sharding.multihost import batch_spec, make_global_batch, is_main_process
from pathor1_jax.models.safetensors_load import Source, load_sharded
from pathor1_jax.sharding.params import create_sharded, logical_axes, shard_model, state_shardings
from pathor1_jax.sharding.rules import preset

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
import pathor1_jax.models.safetensors_load as sl
reads = []
original_read = sl.CheckpointReader.read
def counting_read(self, name, index=None):
    out = original_read(self, name, index)
    reads.append((name, out.shape))
    return out
sl.CheckpointReader.read = counting_read
where = lambda state: state_shardings(state, mesh, rules)
loaded = load_sharded(lambda: Toy(nnx.Rngs(1)), tmp, sources, where)
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
# a stacked (scanned) parameter from one tensor per layer: each device reads its slice of each layer
from pathor1_jax.models.scan import stack_layers

class Stacked(nnx.Module):
    def __init__(self, rngs):
        self.layers = stack_layers([Linear(16, 32, use_bias=False, axes=("embed", "mlp"), rngs=rngs)
                                    for _ in range(3)])

stacked_ref = np.asarray(Stacked(nnx.Rngs(2)).layers.kernel.get_value())  # [3, 16, 32]
layer_tensors = {f"l{i}.weight": np.ascontiguousarray(stacked_ref[i].T) for i in range(3)}
save_file(layer_tensors, str(tmp / "s.safetensors"))
reads.clear()
source = Source(("l0.weight", "l1.weight", "l2.weight"), perm=(1, 0))
stacked = load_sharded(lambda: Stacked(nnx.Rngs(0)), tmp / "s.safetensors", {"layers.kernel": source}, where)
x = stacked.layers.kernel.get_value()
assert x.sharding.spec == P(None, "fsdp", "tensor"), x.sharding  # ("layers", "embed", "mlp")
np.testing.assert_array_equal(np.asarray(x), stacked_ref)
assert {s for _, s in reads} == {(16, 8)} and len(reads) == 3 * 8, reads  # [32/2, 16/2] per layer, device
try:
    partial = {k: v for k, v in sources.items() if k != "down.kernel"}
    load_sharded(lambda: Toy(nnx.Rngs(1)), tmp, partial, where)
    raise SystemExit("missing source not reported")
except KeyError as e:
    assert "parameter down.kernel: no checkpoint tensor is mapped to it" in str(e), e
try:
    load_sharded(lambda: Toy(nnx.Rngs(1)), tmp, {**sources, "down.kernel": "down.weight"}, where)
    raise SystemExit("shape mismatch not reported")
except ValueError as e:
    assert "parameter down.kernel: checkpoint tensor 'down.weight' gives shape (16, 32)" in str(e), e
print("OK")
"""


QWEN = r"""
import dataclasses, tempfile, time
import jax, jax.numpy as jnp, numpy as np, optax
jax.config.update("jax_default_matmul_precision", "highest")
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from pathor1_jax.models import qwen2_5_vl
from pathor1_jax.logical import logical_to_spec, use_rules
from pathor1_jax.sharding.mesh import make_mesh
from pathor1_jax.sharding.multihost import batch_spec, make_global_batch
from pathor1_jax.sharding.params import create_sharded, logical_axes, state_shardings
from pathor1_jax.sharding.rules import preset

t0 = time.time()
# a 2048-token vocabulary (special tokens moved below it) keeps the 3 x 3 steps quick
cfg = dataclasses.replace(qwen2_5_vl.tiny_config(vocab_size=2048), image_token_id=2000, video_token_id=2001,
                          vision_start_token_id=2002, vision_end_token_id=2003)  # fmt: skip
B, T, grid = 8, 16, (1, 4, 4)  # each sample: one 56 px image = 16 patches = 4 image tokens
rng = np.random.default_rng(0)
ids = rng.integers(0, 1000, size=(B, T))
ids[:, 1] = cfg.vision_start_token_id
ids[:, 2:6] = cfg.image_token_id
ids[:, 6] = cfg.vision_end_token_id
mask = np.ones((B, T), np.int32)
mask[1, 12:] = 0  # one right-padded row
thw = np.array([grid] * B)
pixels = rng.standard_normal((B * 16, cfg.vision.patch_dim)).astype(np.float32)
prep = qwen2_5_vl.prepare_inputs(cfg, ids, mask, thw, (ids == cfg.image_token_id).astype(np.int32), B * 16)
host = {"input_ids": ids, "segment_ids": mask, "labels": np.where(mask == 1, np.roll(ids, -1, 1), -1)}
host["labels"][:, -1] = -1

def make():
    return qwen2_5_vl.Qwen2_5_VLForConditionalGeneration(cfg, rngs=nnx.Rngs(0))

def loss_fn(model, batch, position_ids, pixel_values, vision_index):
    logits = model(batch["input_ids"], pixel_values=pixel_values, position_ids=position_ids,
                   segment_ids=batch["segment_ids"], vision_index=vision_index)
    valid = batch["labels"] >= 0
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, batch["labels"], 0))
    return jnp.sum(ce * valid) / jnp.sum(valid)

def train(mesh, rules):
    if mesh is None:
        model = make()
        inputs = (host, prep["position_ids"], pixels, prep["vision_index"])
        batch, pos, pix, vidx = jax.tree.map(jnp.asarray, inputs)
    else:
        model = create_sharded(make, mesh, rules)
        bspec = batch_spec(rules)
        batch = make_global_batch(host, mesh, bspec)
        pos = jax.device_put(prep["position_ids"], NamedSharding(mesh, P(None, *bspec)))
        pix, vidx = jax.device_put((pixels, prep["vision_index"]), NamedSharding(mesh, P()))
    # eps=1e-6: Adam divides by sqrt(v) + eps, so for gradients far below eps it amplifies float32
    # summation-order rounding by lr/eps. Measured: sharded and single-device gradients agree to
    # 1e-7 relative, yet with eps=1e-8 parameters drift up to 6e-6 apart in 3 steps here (3e-5 with
    # the full 151,936-token vocabulary); with eps=1e-6 they stay within 1.3e-6.
    opt = nnx.Optimizer(model, optax.adamw(1e-3, eps=1e-6, weight_decay=0.1), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, batch, pos, pix, vidx):
        loss, grads = nnx.value_and_grad(loss_fn)(model, batch, pos, pix, vidx)
        opt.update(model, grads)
        return loss

    losses = []
    for _ in range(3):
        if mesh is None:
            losses.append(float(step(model, opt, batch, pos, pix, vidx)))
        else:
            with use_rules(mesh, rules):
                losses.append(float(step(model, opt, batch, pos, pix, vidx)))
    params = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    return losses, params, opt

ref_losses, ref_params, _ = train(None, None)
print("one device", ref_losses, f"{time.time() - t0:.1f}s", flush=True)
for mesh_cfg, name in [({"data": 2, "fsdp": 2, "tensor": 2}, "fsdp_tp"), ({"fsdp": 8}, "fsdp")]:
    mesh, rules = make_mesh(mesh_cfg), preset(name)
    losses, params, opt = train(mesh, rules)
    np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=1e-5)
    worst = 0.0
    opt_state = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(opt))}
    for key, var in params.items():
        x = var.get_value()
        expected = NamedSharding(mesh, logical_to_spec(logical_axes(var), rules))
        assert x.sharding.is_equivalent_to(expected, x.ndim), (name, key, x.sharding.spec, expected.spec)
        mu = opt_state[next(k for k in opt_state if k.endswith(key) and ".mu." in f".{k}.")].get_value()
        assert mu.sharding.is_equivalent_to(expected, x.ndim), (name, key, "mu", mu.sharding.spec)
        err = float(np.max(np.abs(np.asarray(x) - np.asarray(ref_params[key].get_value()))))
        worst = max(worst, err)
        assert err <= 1e-5, (name, key, err)
    print(name, mesh_cfg, losses, f"max |param diff| {worst:.2e}", f"{time.time() - t0:.1f}s", flush=True)

# HF checkpoint → sharded model, each device reading its slice
model = make()
path = tempfile.mkdtemp() + "/tiny"
qwen2_5_vl.save_pretrained(model, path)
mesh, rules = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}), preset("fsdp_tp")
loaded = qwen2_5_vl.load_pretrained(path, shardings=lambda s: state_shardings(s, mesh, rules))
flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
want = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in flat}
for p, v in nnx.to_flat_state(nnx.state(loaded, nnx.Param)):
    key, x = ".".join(map(str, p)), v.get_value()
    expected = NamedSharding(mesh, logical_to_spec(logical_axes(v), rules))
    assert x.sharding.is_equivalent_to(expected, x.ndim), key
    np.testing.assert_array_equal(np.asarray(x), want[key], err_msg=key)
print("loaded", len(want), "parameters sharded", f"{time.time() - t0:.1f}s")
print("OK")
"""


OPTIMIZER = r"""
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from pathor1_jax.models.layers import Embed, Linear, RMSNorm
from pathor1_jax.logical import use_rules
from pathor1_jax.sharding.mesh import abstract_mesh, make_mesh
from pathor1_jax.sharding.params import create_sharded
from pathor1_jax.sharding.report import per_device_bytes, totals
from pathor1_jax.sharding.rules import preset
from pathor1_jax.train.losses import per_token_nll, shifted_targets
from pathor1_jax.train.optim import make_optimizer
from pathor1_jax.train.step import StepSpec, abstract_state, init_state, jit_step
from pathor1_jax.train.trainer import put_batch

class Toy(nnx.Module):
    def __init__(self, rngs):
        self.embed = Embed(64, 16, rngs=rngs)
        self.up = Linear(16, 32, use_bias=True, axes=("embed", "mlp"), rngs=rngs)
        self.down = Linear(32, 16, use_bias=False, axes=("mlp", "embed"), rngs=rngs)
        self.norm = RMSNorm(16, eps=1e-6, axis="embed", rngs=rngs)

def nll(model, micro):
    x = model.embed(micro["input_ids"])
    hidden = model.norm(x + model.down(jax.nn.silu(model.up(x))))
    targets, valid = shifted_targets(micro["labels"], micro["segment_ids"])
    return per_token_nll(hidden, model.embed.embedding[...].T, targets, chunk=8), valid

make = lambda: Toy(nnx.Rngs(0))
mesh, rules = make_mesh({"fsdp": 8}), preset("fsdp")
optim = dict(lr=1e-2, warmup_steps=1, min_lr_ratio=0.1, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.1,
             clip_norm=1.0)
tx, _ = make_optimizer(optim, 10, freeze=(r"^up\.bias",))
with use_rules(mesh, rules):
    graphdef, state = init_state(create_sharded(make, mesh, rules), tx, 0)

def moments(opt_state):
    flat = jax.tree_util.tree_flatten_with_path(opt_state)[0]
    keys = lambda p: ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p)
    return {keys(p): x for p, x in flat if ".mu." in keys(p) or ".nu." in keys(p)}

def check(state):
    params = {".".join(p): x for p, x in nnx.to_flat_state(nnx.State(state["params"]))}
    found = moments(state["opt_state"])
    assert len(found) == 2 * (len(params) - 1), sorted(found)  # the frozen bias has none
    for key, m in found.items():
        p = params[key.split(".mu.")[-1].split(".nu.")[-1]]
        assert m.sharding.is_equivalent_to(p.sharding, m.ndim), (key, m.sharding, p.sharding)
        assert m.addressable_shards[0].data.nbytes <= p.addressable_shards[0].data.nbytes, key
    return sum(m.addressable_shards[0].data.nbytes for m in found.values())

moment_bytes = check(state)
full = sum(x.nbytes for x in moments(state["opt_state"]).values())
assert moment_bytes * 8 == full, (moment_bytes, full)  # every parameter here has an 8-way fsdp axis
for x in jax.tree.leaves(state):
    assert x.sharding.mesh == mesh, x.sharding
# the estimate of `pathor1 shardings` is what the trainer allocates (one code path)
opt_bytes = per_device_bytes(state["opt_state"], jax.tree.map(lambda x: x.sharding, state["opt_state"]))
estimate = totals(nnx.state(nnx.eval_shape(make)), abstract_mesh({"fsdp": 8}, 8), rules, tx)
assert estimate.opt_state_bytes == opt_bytes, (estimate, opt_bytes)
# the abstract state for AOT compilation carries the same shapes, dtypes and shardings
_, abstract = abstract_state(make, tx, mesh, rules)
same = jax.tree.map(lambda a, x: (a.shape, a.dtype) == (x.shape, x.dtype) and a.sharding == x.sharding,
                    abstract, state)
assert all(jax.tree.leaves(same)), same

step = jit_step(nll)
ids = np.random.default_rng(0).integers(0, 64, size=(1, 8, 6))
batch = {"input_ids": ids, "labels": ids, "segment_ids": np.ones_like(ids)}
spec = StepSpec(graphdef=graphdef, tx=tx, freeze=(r"^up\.bias",))
losses = []
with use_rules(mesh, rules):
    for _ in range(3):
        state, metrics = step(spec, state, put_batch(batch, mesh, rules))
        losses.append(float(metrics["loss"]))
assert step._cache_size() == 1, step._cache_size()  # steps 2 and 3 reuse step 1's executable
assert losses[2] < losses[0], losses
assert check(state) == moment_bytes
print("moment bytes per device", moment_bytes, "of", full)
print("OK")
"""


def test_toy_sharded_creation_loading_and_batches_on_8_devices():
    out = run_on_8_devices(TOY)
    assert out.strip().endswith("OK"), out
    assert "created fsdp_tp {'down.kernel': \"P('tensor', 'fsdp')\"" in out, out
    assert "created fsdp {'down.kernel': \"P(None, 'fsdp')\"" in out, out


def test_qwen2_5_vl_three_adamw_steps_match_one_device():
    """Image + text batch; meshes (data=2, fsdp=2, tensor=2) with fsdp_tp and (fsdp=8) with fsdp:
    losses and every parameter after 3 AdamW steps equal one device within 1e-5; every parameter
    and its Adam moment carry the rules' sharding; a HF checkpoint loads straight into its shards."""
    out = run_on_8_devices(QWEN)
    assert out.strip().endswith("OK"), out
    assert "fsdp_tp {'data': 2, 'fsdp': 2, 'tensor': 2}" in out and "fsdp {'fsdp': 8}" in out, out


def test_optimizer_state_is_sharded_like_the_parameters_and_steps_compile_once():
    """FSDP on 8 devices: every AdamW moment is laid out like its parameter (1/8 of it per device),
    the per-device optimizer bytes equal `pathor1 shardings`' estimate and `abstract_state`'s
    layout, and the train step compiles once (steps 2 and 3 reuse it)."""
    out = run_on_8_devices(OPTIMIZER)
    assert out.strip().endswith("OK"), out

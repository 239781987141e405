"""Mesh config, rules, layout validation and `pathor1 shardings` (abstract meshes: no devices needed)."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from pathor1_jax.cli import main as cli_main
from pathor1_jax.errors import UserError
from pathor1_jax.logical import logical_to_spec
from pathor1_jax.models import layers
from pathor1_jax.models.layers import Embed, Linear, RMSNorm
from pathor1_jax.sharding.mesh import abstract_mesh, mesh_shape, parse_mesh_arg
from pathor1_jax.sharding.multihost import batch_spec, multi_process_env
from pathor1_jax.sharding.params import (
    abstract_params,
    layouts,
    logical_axes,
    optimizer_shardings,
    state_shardings,
)
from pathor1_jax.sharding.report import totals
from pathor1_jax.sharding.rules import LOGICAL_AXES, dp, fsdp, fsdp_tp, normalize_rules, rules_from_config
from pathor1_jax.train.optim import make_optimizer

OPTIM = dict(lr=1e-3, warmup_steps=1, min_lr_ratio=0.1, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1,
             clip_norm=1.0)  # fmt: skip


class Toy(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, embed=16, mlp=32, vocab=64, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.embed = Embed(vocab, embed, **kw)
        self.up = Linear(embed, mlp, use_bias=True, axes=("embed", "mlp"), **kw)
        self.down = Linear(mlp, embed, use_bias=False, axes=("mlp", "embed"), **kw)
        self.norm = RMSNorm(embed, eps=1e-6, axis="embed", **kw)


def toy_state(**kw) -> nnx.State:
    return nnx.state(nnx.eval_shape(lambda: Toy(nnx.Rngs(0), **kw)))


# ----------------------------------------------------------------------------- mesh


def test_mesh_fill_and_dcn():
    assert mesh_shape({"data": 1, "fsdp": -1, "tensor": 2}, 16) == ((1, 8, 2), (1, 1, 1))
    # 2 slices of 8 devices, data parallel across slices: the data axis spans 2 slices
    ici, dcn = mesh_shape({"data": 1, "fsdp": -1, "tensor": 2, "dcn": {"data": 2}}, 16)
    assert (ici, dcn) == ((1, 4, 2), (2, 1, 1))
    assert dict(abstract_mesh({"fsdp": -1, "tensor": 2, "dcn": {"data": 2}}, 16).shape) == {
        "data": 2,
        "fsdp": 4,
        "tensor": 2,
    }
    assert parse_mesh_arg("data=2, fsdp=4,tensor=1") == {"data": 2, "fsdp": 4, "tensor": 1}
    assert parse_mesh_arg("fsdp=-1,dcn.data=2") == {"fsdp": -1, "dcn": {"data": 2}}


@pytest.mark.parametrize(
    "config, n, message",
    [
        ({"data": 2, "fsdp": 2, "tensor": 1}, 8, r"multiply to 4, but there are 8 devices"),
        ({"data": 3, "fsdp": -1}, 8, r"cannot fill 8 devices"),
        ({"data": -1, "fsdp": -1}, 8, r"at most one axis may be -1"),
        ({"pipeline": 2, "fsdp": -1}, 8, r"unknown mesh axis \['pipeline'\]"),
        ({"fsdp": -1, "dcn": {"data": 3}}, 8, r"3 slices do not divide 8 devices"),
        ({"fsdp": 0}, 8, r"must be positive or -1"),
    ],
)
def test_mesh_errors(config, n, message):
    with pytest.raises(ValueError, match=message):
        mesh_shape(config, n)


# ----------------------------------------------------------------------------- rules


def test_presets_map_parameters_and_activations():
    r = fsdp_tp()
    assert logical_to_spec(("embed", "mlp"), r) == P("fsdp", "tensor")
    assert logical_to_spec(("mlp", "embed"), r) == P("tensor", "fsdp")
    assert logical_to_spec(("vocab", "embed"), r) == P("tensor", "fsdp")
    # activations: the batch takes fsdp first, so embed stays whole; heads go to tensor
    assert logical_to_spec(("batch", "length", "embed"), r) == P(("data", "fsdp"), None, None)
    assert logical_to_spec(("batch", "length", "heads", None), r) == P(("data", "fsdp"), None, "tensor", None)
    assert logical_to_spec(("embed", "mlp"), fsdp()) == P("fsdp", None)
    assert logical_to_spec(("batch", "length", "embed"), fsdp()) == P(("data", "fsdp", "tensor"), None, None)
    assert logical_to_spec(("embed", "mlp"), dp()) == P(None, None)
    assert batch_spec(fsdp_tp()) == P(("data", "fsdp"))


def test_rules_from_config():
    assert rules_from_config({"preset": "dp"}) == tuple(dp())
    assert rules_from_config(None) == tuple(fsdp())
    # ml_collections turns tuples into lists: both read back as tuples
    assert rules_from_config({"rules": [["batch", ["data", "fsdp"]], ["embed", None]]}) == (
        ("batch", ("data", "fsdp")),
        ("embed", None),
    )
    with pytest.raises(ValueError, match=r"unknown sharding preset 'zero3'"):
        rules_from_config({"preset": "zero3"})


def test_rule_naming_unknown_mesh_axis_is_an_error():
    with pytest.raises(
        ValueError, match=r"rule 1 \('mlp' -> \('tensor', 'model'\)\) names unknown mesh axis 'model'"
    ):
        normalize_rules([("embed", "fsdp"), ("mlp", ("tensor", "model"))])


def test_indivisible_dimension_names_parameter_and_dimension():
    mesh = abstract_mesh({"fsdp": -1, "tensor": 8}, 16)  # fsdp=2, tensor=8
    with pytest.raises(ValueError) as err:
        layouts(toy_state(mlp=36), mesh, fsdp_tp())
    text = str(err.value)
    assert "parameter down.kernel: dimension 0 (logical axis 'mlp', size 36)" in text
    assert "not divisible by mesh axes 'tensor' of size 8" in text
    with pytest.raises(ValueError) as err:
        layouts(toy_state(embed=10, mlp=32), abstract_mesh({"fsdp": 4}, 4), fsdp())
    for name in ("down.kernel: dimension 1", "embed.embedding: dimension 1", "norm.weight: dimension 0"):
        assert (
            f"parameter {name} (logical axis 'embed', size 10) is not divisible by mesh axes 'fsdp' of size 4"
            in (str(err.value))
        )


def test_every_variable_gets_the_rules_sharding():
    mesh = abstract_mesh({"data": 2, "fsdp": 2, "tensor": 2}, 8)
    shardings = state_shardings(toy_state(), mesh, fsdp_tp())
    got = {".".join(map(str, p)): v.get_value().spec for p, v in nnx.to_flat_state(shardings)}
    assert got == {
        "down.kernel": P("tensor", "fsdp"),
        "embed.embedding": P("tensor", "fsdp"),
        "norm.weight": P("fsdp"),
        "up.bias": P("tensor"),
        "up.kernel": P("fsdp", "tensor"),
    }


def test_totals_count_shards_and_the_optimizer_state():
    mesh = abstract_mesh({"data": 2, "fsdp": 2, "tensor": 2}, 8)
    # embedding 64x16 /4, up 16x32 /4 + bias 32 /2, down 32x16 /4, norm 16 /2
    per_device = 64 * 16 // 4 + 16 * 32 // 4 + 32 // 2 + 32 * 16 // 4 + 16 // 2
    tx = optax.adamw(1e-3)
    t = totals(toy_state(), mesh, fsdp_tp(), tx)
    assert (t.num_params, t.params_per_device) == (64 * 16 + 16 * 32 + 32 + 32 * 16 + 16, per_device)
    # AdamW: mu and nu laid out like their parameters, plus a replicated int32 step count
    assert (t.param_bytes, t.opt_state_bytes) == (4 * per_device, 8 * per_device + 4)
    # frozen parameters keep no optimizer state (the trainer's optimizer: + a schedule step count)
    frozen, _ = make_optimizer(OPTIM, 10, freeze=(r"^embed\.",))
    assert totals(toy_state(), mesh, fsdp_tp(), frozen).opt_state_bytes == 8 * (per_device - 64 * 16 // 4) + 8
    # bfloat16 parameters: optax keeps the moments in the parameters' dtype
    t = totals(toy_state(param_dtype=jnp.bfloat16), mesh, fsdp_tp(), tx)
    assert (t.param_bytes, t.opt_state_bytes) == (2 * per_device, 4 * per_device + 4)


def test_optimizer_state_laid_out_like_its_parameters():
    mesh = abstract_mesh({"data": 2, "fsdp": 2, "tensor": 2}, 8)
    params = abstract_params(toy_state(), mesh, fsdp_tp())
    tx, _ = make_optimizer(OPTIM, 10, freeze=(r"^norm\.",))
    opt_state = jax.eval_shape(tx.init, params)
    shardings = optimizer_shardings(opt_state, params, mesh)
    want = {".".join(k): x.sharding.spec for k, x in _flat(params)}
    got = {".".join(k): s.spec for k, s in _flat(shardings)}
    moments = {k: v for k, v in got.items() if ".mu." in k or ".nu." in k}
    assert len(moments) == 2 * (len(want) - 1)  # the frozen norm has none
    for key, spec in moments.items():
        assert spec == want[key.split(".mu.")[-1].split(".nu.")[-1]], key
    assert all(spec == P() for key, spec in got.items() if key not in moments), got


def _flat(tree) -> list[tuple[tuple[str, ...], object]]:
    return [(tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in p), x)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]  # fmt: skip


# ----------------------------------------------------------------------------- multi-host env


def test_multi_process_env():
    assert multi_process_env({}) is None
    assert multi_process_env({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
                              "JAX_PROCESS_ID": "3"}) == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}  # fmt: skip
    assert multi_process_env({"TPU_WORKER_HOSTNAMES": "10.0.0.2"}) is None  # single-host TPU VM
    assert multi_process_env({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}) == {}
    assert multi_process_env({"SLURM_NTASKS": "2"}) == {}
    assert multi_process_env({"PATHOR1_MULTIHOST": "1"}) == {}
    with pytest.raises(ValueError, match="JAX_PROCESS_ID is not"):
        multi_process_env({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"})


# ----------------------------------------------------------------------------- pathor1 shardings

CONFIG_7B = Path(__file__).resolve().parents[1] / "configs" / "qwen2_5_vl_7b.py"


def qwen_7b_counts(fsdp: int) -> tuple[int, int]:
    """(parameters, parameters per device) of Qwen2.5-VL-7B under the `fsdp` preset, by hand.

    Everything with a model-width dimension (embed / vision_embed / vision_merge) is split `fsdp`
    ways; the q/k/v biases, the vision qkv and MLP biases and the merger's first bias are not.
    """
    d, f, L, kv, V = 3584, 18944, 28, 512, 152064
    vd, vf, vL, merged, patch = 1280, 3420, 32, 5120, 1176
    text_layer_split = d * d + 2 * d * kv + d * d + 3 * d * f + 2 * d  # q, k, v, o, MLP, 2 norms
    text_layer_whole = d + 2 * kv  # q, k, v biases
    vision_block_split = (
        vd * 3 * vd + vd * vd + vd + 3 * vd * vf + vd + 2 * vd
    )  # qkv, proj(+b), MLP, down b, norms
    vision_block_whole = 3 * vd + 2 * vf  # qkv bias, gate/up biases
    split = (
        2 * V * d + L * text_layer_split + d  # embed, lm_head, layers, final norm
        + patch * vd + vL * vision_block_split
        + vd + merged * merged + merged * d + d  # merger: ln_q, mlp.0 kernel, mlp.2 kernel + bias
    )  # fmt: skip
    whole = L * text_layer_whole + vL * vision_block_whole + merged  # + merger mlp.0 bias
    return split + whole, split // fsdp + whole


def test_shardings_command_7b_on_256_devices(capsys):
    config = CONFIG_7B  # the published Qwen2.5-VL-7B sizes, mesh fsdp=-1, preset fsdp, float32
    assert cli_main(["shardings", "--config", str(config), "--devices", "256"]) == 0
    out = capsys.readouterr().out
    n, per_device = qwen_7b_counts(256)
    assert n == 8_292_166_656  # the published size of Qwen2.5-VL-7B
    assert f"parameters: {n:,} ({per_device:,} per device)" in out
    assert f"per device: params {4 * per_device:,} B" in out
    # the trainer's default AdamW: float32 mu and nu like their parameters + two int32 step counts
    assert f"per device: optimizer state {8 * per_device + 8:,} B" in out
    assert f"per device: total params + optimizer state {12 * per_device + 8:,} B" in out
    assert "mesh: data=1, fsdp=256, tensor=1 (256 devices)" in out
    # the decoder layers stacked (scanned): one row for all 28 layers' up_proj
    row = next(
        line for line in out.splitlines() if line.startswith("model.language_model.layers.mlp.up_proj.kernel")
    )
    assert row.split()[1:] == [
        "28x3584x18944",
        "float32",
        "(layers,",
        "embed,",
        "mlp)",
        "(None,",
        "'fsdp',",
        "None)",
        str(4 * 28 * 3584 * 18944 // 256),
    ]

    # bfloat16 parameters get bfloat16 moments (optax's default); --mesh overrides the config's mesh
    assert cli_main(["shardings", "--config", str(config), "--devices", "256", "--mesh", "data=2,fsdp=128",
                     "--param-dtype", "bfloat16"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    _, per_device = qwen_7b_counts(128)
    assert f"per device: params {2 * per_device:,} B" in out
    assert f"per device: optimizer state {4 * per_device + 8:,} B" in out
    assert f"per device: total params + optimizer state {6 * per_device + 8:,} B" in out

    assert cli_main(["shardings", "--config", str(config), "--devices", "1024",
                     "--mesh", "fsdp=1,tensor=1024", "--preset", "fsdp_tp"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "parameter model.language_model.layers.self_attn.k_proj.kernel: dimension 2 " in err
    assert "(logical axis 'kv_heads', size 512) is not divisible by mesh axes 'tensor' of size 1024" in err


def test_abstract_layout_needs_no_memory():
    """A 7B layout on 256 hypothetical devices is planned with shape structs only."""
    from pathor1_jax.models import qwen2_5_vl
    from pathor1_jax.models.qwen2_5_vl.presets import qwen2_5_vl_7b

    cfg = qwen2_5_vl_7b()
    abstract = nnx.eval_shape(
        lambda: qwen2_5_vl.Qwen2_5_VLForConditionalGeneration(cfg, param_dtype=jnp.bfloat16)
    )
    leaves = jax.tree.leaves(nnx.state(abstract))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert sum(math.prod(x.shape) for x in leaves) == qwen_7b_counts(1)[0]
    # every parameter is annotated, one known logical axis per dimension
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        axes = logical_axes(var)
        assert axes is not None and len(axes) == var.get_value().ndim, path
        assert set(axes) <= set(LOGICAL_AXES), (path, axes)


def test_parameters_are_flax_s_keys_eagerly_and_traced(monkeypatch):
    """`layers.next_key` (the traced count set whole: model construction under tracing is no longer
    quadratic in the number of parameters) draws `RngStream()`'s keys and leaves its count."""

    def params(eager: bool) -> dict:
        def make():
            rngs = nnx.Rngs(3)
            return nnx.state(Toy(rngs)), rngs.params.count.get_value()

        state, count = make() if eager else jax.jit(make)()
        return {"count": count} | {path: v.get_value() for path, v in nnx.to_flat_state(state)}

    ours = params(True), params(False)
    monkeypatch.setattr(layers, "next_key", lambda stream: stream())
    for got, want in zip(ours, (params(True), params(False)), strict=True):
        assert got.keys() == want.keys() and int(got["count"]) == 5  # one key per parameter
        for path in want:
            np.testing.assert_array_equal(got[path], want[path], err_msg=str(path))


def test_load_sharded_reads_params_and_initialises_other_variables(tmp_path):
    """One-device mesh: parameters come from the file (PyTorch [out, in] transposed); RNG state and
    statistics the checkpoint does not hold are initialised by the constructor."""
    import numpy as np
    from safetensors.numpy import save_file

    from pathor1_jax.models.safetensors_load import Source, load_sharded
    from pathor1_jax.sharding.mesh import make_mesh

    class WithState(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.up = Linear(4, 8, use_bias=False, axes=("embed", "mlp"), rngs=rngs)
            self.rngs = rngs
            self.count = nnx.BatchStat(jnp.full((4,), 7.0))

    weight = np.arange(32, dtype=np.float32).reshape(8, 4)
    save_file({"up.weight": weight}, str(tmp_path / "model.safetensors"))
    mesh = make_mesh({"fsdp": 1}, jax.devices()[:1])
    sources = {"up.kernel": Source("up.weight", perm=(1, 0))}
    where = partial(state_shardings, mesh=mesh, rules=fsdp())
    model = load_sharded(lambda: WithState(nnx.Rngs(0)), tmp_path, sources, where)
    np.testing.assert_array_equal(np.asarray(model.up.kernel[...]), weight.T)
    np.testing.assert_array_equal(np.asarray(model.count[...]), np.full((4,), 7.0))
    assert model.rngs.default.count[...] == WithState(nnx.Rngs(0)).rngs.default.count[...] == 1
    with pytest.raises(UserError, match="tensor 'up.w' is not in the checkpoint"):
        load_sharded(lambda: WithState(nnx.Rngs(0)), tmp_path, {"up.kernel": "up.w"}, where)

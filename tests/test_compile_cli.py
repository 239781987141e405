"""`pathor1 compile`: TPU slices by name, the report of a tiny config compiled for a deviceless v5e-8
(libtpu), a config that cannot fit (exit 1), and one-line errors for bad topologies and layouts and
for a kernel that the TPU compiler refuses."""

from __future__ import annotations

import contextlib
import io
import json

import jax
import jax.numpy as jnp
import pytest
from tpu import tpu_devices

from pathor1_jax.cli import main
from pathor1_jax.errors import UserError
from pathor1_jax.kernels import flash_attention as fa
from pathor1_jax.sharding.mesh import make_mesh
from pathor1_jax.sharding.rules import preset
from pathor1_jax.sharding.topology import CHIPS, default_shape, parse_topology
from pathor1_jax.train.aot import AotStep, compile_step

GIB = 2**30


@pytest.mark.parametrize(
    "name, chip, shape, devices, hosts",
    [
        ("v5e-16", "v5e", (4, 4), 16, 4),
        ("v5litepod-16", "v5e", (4, 4), 16, 4),
        ("v5e-8", "v5e", (2, 4), 8, 2),
        ("v6e-256", "v6e", (16, 16), 256, 64),
        ("v5p-8", "v5p", (2, 2, 1), 4, 1),  # v5p counts TensorCores: 2 per chip
        ("v5p-64", "v5p", (2, 4, 4), 32, 8),
        ("v5p-256", "v5p", (4, 4, 8), 128, 32),
        ("v4-8", "v4", (2, 2, 1), 4, 1),
        ("v5e:4x4", "v5e", (4, 4), 16, 4),
        ("v5p:4x4x12", "v5p", (4, 4, 12), 192, 48),
        ("v5p:2x2", "v5p", (2, 2, 1), 4, 1),
    ],
)
def test_accelerator_types_and_shapes(name, chip, shape, devices, hosts):
    topo = parse_topology(name)
    assert (topo.chip.name, topo.shape, topo.num_devices, topo.num_hosts) == (chip, shape, devices, hosts)


def test_slices_multiply_devices_and_hosts():
    topo = parse_topology("v5e-16", slices=2)
    assert (topo.num_devices, topo.num_hosts, topo.accelerator_type) == (32, 8, "v5e-16")


def test_default_shapes_follow_cloud_tpu():
    assert [default_shape(n, 2) for n in (1, 4, 8, 16, 32, 64, 128, 256)] == [
        (1, 1), (2, 2), (2, 4), (4, 4), (4, 8), (8, 8), (8, 16), (16, 16)
    ]  # fmt: skip
    assert [default_shape(n, 3) for n in (4, 8, 16, 32, 64, 128)] == [
        (2, 2, 1), (2, 2, 2), (2, 2, 4), (2, 4, 4), (4, 4, 4), (4, 4, 8)
    ]  # fmt: skip


def test_chip_table():
    # published peak bf16 FLOP/s per chip (cloud.google.com/tpu/docs) and libtpu's usable HBM
    assert {k: c.peak_bf16_flops for k, c in CHIPS.items()} == {
        "v4": 275e12, "v5e": 197e12, "v5p": 459e12, "v6e": 918e12
    }  # fmt: skip
    assert CHIPS["v5e"].hbm_bytes == int(15.75 * GIB)


@pytest.mark.parametrize(
    "name, message",
    [
        ("v7x-8", "unknown TPU 'v7x'"),
        ("v5e-12", "no default v5e slice of 12 chips"),
        ("v5p-7", "not a multiple of 2"),
        ("v5e-512", "at most 256"),
        ("v5e:4x4x4", "a v5e slice has 2 dimensions"),
        ("tpu", "expected a Cloud TPU accelerator type"),
    ],
)
def test_bad_topology_names(name, message):
    with pytest.raises(UserError, match=message):
        parse_topology(name)


# ------------------------------------------------------------------------------ compiled (libtpu)


def compile_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(["compile", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def tiny_v5e_8(tmp_path_factory):
    """`pathor1 compile` of the demo SFT config (tiny model, 4 rows x 256 tokens and 256 patches per
    host) for v5e-8, run once: exit code, stdout and the JSON."""
    out = tmp_path_factory.mktemp("compile") / "report.json"
    stdout = io.StringIO()  # capsys is function-scoped
    with contextlib.redirect_stdout(stdout):
        code = main(["compile", "--config", "configs/demo_sft.py", "--topology", "v5e-8", "--json", str(out)])
    return code, stdout.getvalue(), json.loads(out.read_text())


@pytest.mark.libtpu
def test_tiny_config_on_v5e_8_fits_and_writes_the_report(tiny_v5e_8):
    code, text, report = tiny_v5e_8
    assert code == 0
    assert list(report) == [
        "topology", "devices", "per_device_bytes", "hbm_bytes", "fits", "flops_per_step", "attention",
        "policy_loss", "compile_seconds",
    ]  # fmt: skip
    per_device = report["per_device_bytes"]
    assert list(per_device) == ["arguments", "outputs", "temporaries", "total"]
    assert (report["topology"], report["devices"], report["fits"]) == ("v5e-8", 8, True)
    assert report["hbm_bytes"] == int(15.75 * GIB)
    # the outputs (the new state) alias the donated state: total = arguments + temporaries + extra outputs
    assert 0 < per_device["arguments"] <= per_device["total"] < 2 * GIB
    assert per_device["total"] >= per_device["arguments"] + per_device["temporaries"]
    assert per_device["total"] <= sum(per_device[k] for k in ("arguments", "outputs", "temporaries"))
    # 8 rows x 256 tokens through a 2-layer decoder and the tied 151,936-token head: ~1e11
    assert 1e10 < report["flops_per_step"] < 1e12
    # the tiny model's head dims (16) have no TPU kernel: the decoder runs xla, the vision tower xla_blocked
    assert report["attention"] == "xla+xla_blocked"
    assert report["policy_loss"] is None and report["compile_seconds"] > 0
    assert "fits" in text and "collectives:" in text and "all-reduce" in text


@pytest.mark.libtpu
def test_grpo_policy_update_compiles_the_mosaic_policy_loss(capsys):
    """The RL stages' hook: GRPO's policy update (tiny model, 4 groups x 4 samples of 96 + 48 tokens)
    for v5e-8, its fused policy loss compiled by Mosaic per shard (forward, dh, dW kernels)."""
    train_head = "--config.freeze=('^model\\.visual\\.',)"  # the demo config freezes the tied head: dW
    code, out, _ = compile_cli(capsys, "--config", "configs/grpo_tiny.py", "--topology", "v5e-8", train_head)
    assert code == 0
    assert "step: rows 16, tokens 2,304, response tokens 768, patches 256" in out
    assert "attention: xla+xla_blocked; policy loss: pallas" in out  # vision tower: xla_blocked
    kernels = out.split("Mosaic kernels (tpu_custom_call): ")[1].splitlines()[0]
    assert all(f"token_logprobs_{k} x" in kernels for k in ("fwd", "dh", "dw")), kernels


@pytest.mark.libtpu
def test_a_config_that_cannot_fit_exits_1(capsys):
    """7B with pure data parallelism on v5e-16: every chip holds all f32 weights and AdamW moments."""
    code, _, err = compile_cli(
        capsys, "--config", "configs/sft_7b.py", "--topology", "v5e-16", "--config.sharding.preset=dp"
    )
    assert code == 1
    assert err.strip().splitlines()[-1].startswith("pathor1 compile: error: does not fit:")
    assert "15.75 GiB usable HBM" in err


@pytest.mark.libtpu
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--topology", "v5e-3"], "no default v5e slice of 3 chips"),
        (["--topology", "v5e-16", "--config.mesh.fsdp=3"], "multiply to 3, but there are 16 devices"),
        (["--topology", "v5e-64"], "is not divisible by mesh axes 'fsdp' of size 64"),  # tiny dims
        (["--topology", "v5e-16", "--config.data.batch_size=2"], "8 rows do not split over the 16"),
    ],
)
def test_bad_topologies_and_layouts_are_one_line_errors(capsys, argv, message):
    code, _, err = compile_cli(capsys, "--config", "configs/demo_sft.py", *argv)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("per_row, fixed, expected", [(1.0, 2.0, 52), (0.3, 1.0, 196), (20.0, 1.0, None)])
def test_max_batch_finds_the_largest_fitting_batch_in_few_compiles(per_row, fixed, expected, capsys):
    """A fake compiler whose per-device GiB grow linearly with data.batch_size (per host) on v5e-16
    (16 chips, 4 hosts: candidates are multiples of 4): the search ends on the largest batch that fits
    after a handful of compiles."""
    from types import SimpleNamespace

    import ml_collections

    from pathor1_jax.commands.compile import max_batch

    topo = parse_topology("v5e-16")
    compiled = []

    def compile_config(config):
        value = int(config.data.batch_size)
        compiled.append(value)
        total = int((fixed + per_row * value / 4) * GIB)  # value / 4 rows per device
        return SimpleNamespace(total=total, hbm_bytes=topo.chip.hbm_bytes, fits=total <= topo.chip.hbm_bytes,
                               compile_seconds=1.0, shapes={"rows": value * 4}, topology=topo)  # fmt: skip

    config = ml_collections.ConfigDict({"data": {"batch_size": 4, "max_patches": 64}})
    report, value = max_batch(config, "data.batch_size", topo, compile_config)
    if expected is None:
        assert report is None and value == 4
        return
    assert value == expected and report.fits
    assert len(compiled) <= 4, compiled  # 2 to find the line, its crossing, one unit past it
    assert not compile_config(ml_collections.ConfigDict({"data": {"batch_size": value + 4}})).fits
    assert "rows per device" in capsys.readouterr().err


@pytest.mark.libtpu
def test_a_kernel_the_compiler_refuses_is_named_in_a_one_line_error(monkeypatch):
    """Flash attention with its scoped-VMEM limit set from the estimate before 52fd32a (head dim 80
    counted unpadded, 60 MiB asked, 64.25 MiB needed on v6e): the compiler's many-line message
    becomes one line with its error, the kernel that failed and the sizes."""
    unpadded = lambda q, k, d, itemsize: 4 * max(q, k) * d * itemsize + 4 * 2**20  # noqa: E731
    monkeypatch.setattr(fa, "tpu_vmem_bytes", unpadded)
    t, heads, d = 65_536, 16, 80
    spec = jax.ShapeDtypeStruct((1, t, heads, d), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((1, t), jnp.int32)

    @jax.jit
    def fwd(q, k, v, ids):
        return fa.flash_attention(q, k, v, segment_ids=ids, backend="tpu", block_sparse=True)

    step = AotStep(fwd, (spec, spec, spec, ids), flops=0.0, shapes={})
    mesh = make_mesh({"fsdp": 1}, tpu_devices("v6e:2x4")[:1])
    with pytest.raises(UserError) as error, jax.default_matmul_precision("default"):
        compile_step(step, mesh, preset("fsdp"), parse_topology("v6e-8"))
    assert str(error.value) == (
        "the TPU compiler refused the step: RESOURCE_EXHAUSTED: E1001: CompileTimeScopedVmemOom in "
        "jit(fwd)/flash_attention_fwd/pallas_call: Scoped allocation with size 64.25M and limit "
        "60.00M exceeded scoped vmem limit by 4.25M."
    )

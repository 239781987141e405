"""Per-device memory of a train step under each sharding preset: XLA's view vs. `pathor1 shardings`.

1. Tiny Qwen2.5-VL (image + text batch) on 8 fake CPU devices: the compiled AdamW train step's
   `memory_analysis()` per device (arguments = params + AdamW state + batch; temporaries), beside
   the abstract estimate of params + AdamW state that `pathor1 shardings` prints. Compiled only,
   from abstract inputs: nothing is allocated or run.
2. The same estimate for Qwen2.5-VL-3B / 7B (float32 parameters as the shipped configs keep them,
   + the trainer's AdamW state, laid out as the trainer lays it out) on v5e-16, v5p-64 and 8xH100,
   under each preset.

    python bench/sharding_memory.py
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    os.environ["XLA_FLAGS"] = flags.strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from pathor1_jax.logical import use_rules  # noqa: E402
from pathor1_jax.models import qwen2_5_vl  # noqa: E402
from pathor1_jax.models.qwen2_5_vl.presets import qwen2_5_vl_3b, qwen2_5_vl_7b  # noqa: E402
from pathor1_jax.sharding.mesh import abstract_mesh, make_mesh  # noqa: E402
from pathor1_jax.sharding.multihost import batch_spec  # noqa: E402
from pathor1_jax.sharding.params import state_shardings  # noqa: E402
from pathor1_jax.sharding.report import totals  # noqa: E402
from pathor1_jax.sharding.rules import preset  # noqa: E402
from pathor1_jax.train.defaults import base_config  # noqa: E402
from pathor1_jax.train.optim import make_optimizer  # noqa: E402

MIB, GB = 1024**2, 1e9
TINY_MESHES = {"dp": {"data": 8}, "fsdp": {"fsdp": 8}, "fsdp_tp": {"data": 2, "fsdp": 2, "tensor": 2}}
# (name, JAX devices, HBM bytes per device). v5p-64 = 64 TensorCores = 32 megacore chips.
HARDWARE = [("v5e-16", 16, 16 * GB), ("v5p-64", 32, 95 * GB), ("8xH100", 8, 80 * GB)]
TENSOR = 4  # tensor-parallel width of the fsdp_tp rows (divides every head / MLP / vocab width)


def tiny_batch(cfg, batch: int = 8, length: int = 16):
    """Host arrays for a batch where every row holds one 56 px image (16 patches, 4 tokens)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 1000, size=(batch, length))
    ids[:, 1], ids[:, 2:6], ids[:, 6] = cfg.vision_start_token_id, cfg.image_token_id, cfg.vision_end_token_id
    mask = np.ones((batch, length), np.int32)
    thw = np.array([(1, 4, 4)] * batch)
    pixels = rng.standard_normal((batch * 16, cfg.vision.patch_dim)).astype(np.float32)
    types = (ids == cfg.image_token_id).astype(np.int32)
    prep = qwen2_5_vl.prepare_inputs(cfg, ids, mask, thw, types, batch * 16)
    labels = np.roll(ids, -1, 1)
    labels[:, -1] = -1
    return (
        {"input_ids": ids, "segment_ids": mask, "labels": labels},
        prep["position_ids"],
        pixels,
        prep["vision_index"],
    )


def loss_fn(model, batch, position_ids, pixel_values, vision_index):
    logits = model(batch["input_ids"], pixel_values=pixel_values, position_ids=position_ids,
                   segment_ids=batch["segment_ids"], vision_index=vision_index)  # fmt: skip
    valid = batch["labels"] >= 0
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, batch["labels"], 0))
    return jnp.sum(ce * valid) / jnp.sum(valid)


def abstract(x, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=sharding)


def tiny_rows() -> list[tuple]:
    cfg = qwen2_5_vl.tiny_config()
    model = nnx.eval_shape(lambda: qwen2_5_vl.Qwen2_5_VLForConditionalGeneration(cfg, rngs=nnx.Rngs(0)))
    opt = nnx.eval_shape(lambda: nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param))
    graphdef, state = nnx.split((model, opt))
    host, pos, pixels, vidx = tiny_batch(cfg)
    rows = []
    for name, mesh_cfg in TINY_MESHES.items():
        mesh, rules = make_mesh(mesh_cfg), preset(name)
        shardings = state_shardings(state, mesh, rules)
        abstract_state = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
        )
        bspec = batch_spec(rules)

        batch_sharding, replicated = NamedSharding(mesh, bspec), NamedSharding(mesh, P())
        batch = jax.tree.map(lambda x, s=batch_sharding: abstract(x, s), host)
        inputs = (
            abstract(pos, NamedSharding(mesh, P(None, *bspec))),
            abstract(pixels, replicated),
            jax.tree.map(lambda x, s=replicated: abstract(x, s), vidx),
        )

        def step(state, batch, pos, pixels, vidx):
            model, opt = nnx.merge(graphdef, state)
            loss, grads = nnx.value_and_grad(loss_fn)(model, batch, pos, pixels, vidx)
            opt.update(model, grads)
            return loss, nnx.state((model, opt))

        with use_rules(mesh, rules):
            compiled = (
                jax.jit(step, donate_argnums=0, out_shardings=(NamedSharding(mesh, P()), shardings))
                .lower(abstract_state, batch, *inputs)
                .compile()
            )
        mem = compiled.memory_analysis()
        t = totals(nnx.state(model), mesh, rules, optax.adamw(1e-3))
        rows.append(
            (
                name,
                ",".join(f"{k}={v}" for k, v in mesh.shape.items()),
                t.total_bytes / MIB,
                mem.argument_size_in_bytes / MIB,
                mem.output_size_in_bytes / MIB,
                mem.alias_size_in_bytes / MIB,
                mem.temp_size_in_bytes / MIB,
            )
        )
    return rows


def big_rows() -> list[tuple]:
    tx, _ = make_optimizer(base_config("sft").optim, 100, ())
    rows = []
    for model_name, make_cfg in (("Qwen2.5-VL-3B", qwen2_5_vl_3b), ("Qwen2.5-VL-7B", qwen2_5_vl_7b)):
        cfg = make_cfg()
        abstract = nnx.eval_shape(lambda cfg=cfg: qwen2_5_vl.Qwen2_5_VLForConditionalGeneration(cfg))
        state = nnx.state(abstract)
        for hw, devices, hbm in HARDWARE:
            for name in ("dp", "fsdp", "fsdp_tp"):
                mesh_cfg = {"data": -1} if name == "dp" else {"fsdp": -1}
                if name == "fsdp_tp":
                    mesh_cfg["tensor"] = TENSOR
                mesh = abstract_mesh(mesh_cfg, devices)
                t = totals(state, mesh, preset(name), tx)
                rows.append(
                    (
                        model_name,
                        hw,
                        name,
                        ",".join(f"{k}={v}" for k, v in mesh.shape.items()),
                        t.param_bytes / GB,
                        t.opt_state_bytes / GB,
                        t.total_bytes / GB,
                        100 * t.total_bytes / hbm,
                    )
                )
    return rows


def table(header: tuple[str, ...], rows: list[tuple], fmt: str) -> str:
    cells = [header] + [tuple(fmt_cell(v, fmt) for v in row) for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def fmt_cell(v, fmt: str) -> str:
    return format(v, fmt) if isinstance(v, float) else str(v)


def main() -> None:
    print(f"jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].platform} devices\n")
    print("Tiny Qwen2.5-VL (float32, batch 8 x 16 tokens, 8 images): AdamW train step, MiB per device")
    header = ("preset", "mesh", "estimate: params+AdamW", "XLA arguments", "XLA outputs", "XLA aliased",
              "XLA temporaries")  # fmt: skip
    print(table(header, tiny_rows(), ".2f"))
    print(
        "\nEstimate per device: float32 params + the trainer's AdamW state, GB (1e9 B);"
        f" fsdp_tp uses tensor={TENSOR}"
    )
    header = ("model", "hardware", "preset", "mesh", "params", "optimizer state", "total", "% of HBM")
    print(table(header, big_rows(), ".2f"))


if __name__ == "__main__":
    main()

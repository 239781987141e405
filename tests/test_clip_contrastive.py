"""The contrastive loss: hand-computed values, and the sharded loss = the single-device loss on 8 devices."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from multidevice import run_on_8_devices

from pathor1_jax.train.contrastive import clip_loss


def test_clip_loss_hand_computed():
    image = jnp.array([[1.0, 0.0], [0.0, 2.0]])
    text = jnp.array([[3.0, 0.0], [1.0, 1.0]])
    scale = jnp.log(jnp.array(10.0))
    # cosines: img0·[t0, t1] = [1, 1/√2]; img1·[t0, t1] = [0, 1/√2]
    c = 1 / np.sqrt(2)
    i2t = [np.log(np.exp(10) + np.exp(10 * c)) - 10, np.log(1 + np.exp(10 * c)) - 10 * c]
    t2i = [np.log(np.exp(10) + 1) - 10, np.log(np.exp(10 * c) * 2) - 10 * c]
    expected = 0.5 * (np.mean(i2t) + np.mean(t2i))
    np.testing.assert_allclose(float(clip_loss(image, text, scale)), expected, rtol=1e-6)


def test_perfect_alignment_has_lower_loss_than_shuffled():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(8, 4)))
    scale = jnp.log(jnp.array(100.0))
    assert clip_loss(x, x, scale) < clip_loss(x, x[::-1], scale)


def test_sharded_loss_and_gradients_equal_single_device():
    out = run_on_8_devices(
        """
        import jax, jax.numpy as jnp, numpy as np
        from pathor1_jax.sharding.mesh import make_mesh
        from pathor1_jax.train.contrastive import clip_loss, sharded_clip_loss
        from jax.sharding import NamedSharding, PartitionSpec as P

        rng = np.random.default_rng(0)
        img, txt = (jnp.asarray(rng.normal(size=(16, 8)), jnp.float32) for _ in range(2))
        scale = jnp.asarray(np.log(1 / 0.07), jnp.float32)
        ref, ref_grads = jax.value_and_grad(clip_loss, argnums=(0, 1, 2))(img, txt, scale)
        layouts = (({"data": 2, "fsdp": 4, "tensor": 1}, ("data", "fsdp")), ({"fsdp": 8}, ("fsdp",)))
        for shape, axes in layouts:
            mesh = make_mesh(shape)
            put = lambda x: jax.device_put(x, NamedSharding(mesh, P(axes)))
            fn = jax.jit(jax.value_and_grad(
                lambda a, b, s: sharded_clip_loss(a, b, s, mesh, axes), argnums=(0, 1, 2)))
            loss, grads = fn(put(img), put(txt), scale)
            assert abs(float(loss) - float(ref)) <= 1e-5 * abs(float(ref)), (loss, ref)
            for g, r in zip(grads, ref_grads):
                np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5, rtol=1e-5)
        print("OK", float(ref))
        """
    )
    assert "OK" in out


def test_step_loss_is_per_device_and_equals_the_global_loss_on_8_devices():
    """`contrastive_loss` as the step runs it (tiny CLIP, fsdp rules, global batch 64 on 8 devices):
    the loss and gradients equal the single-device global loss, and the compiled program scores each
    device's 8 rows against the 64 gathered rows ([8, 64] logits), never a [64, 64] logits matrix."""
    out = run_on_8_devices(
        """
        import re
        import jax, jax.numpy as jnp, numpy as np
        from flax import nnx
        from jax.sharding import NamedSharding, PartitionSpec as P
        from pathor1_jax.logical import logical_to_spec, use_rules
        from pathor1_jax.models import clip
        from pathor1_jax.sharding.mesh import make_mesh
        from pathor1_jax.sharding.rules import fsdp
        from pathor1_jax.train.clip_stage import contrastive_loss

        model = clip.CLIPModel(clip.tiny_config(), rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model)
        rng = np.random.default_rng(0)
        images = jnp.asarray(rng.normal(size=(64, 56, 56, 3)), jnp.float32)
        ids = jnp.asarray(rng.integers(1, 49407, size=(64, 77)), jnp.int32)

        def loss(params, images, ids):
            return contrastive_loss(nnx.merge(graphdef, params), images, ids)

        ref, ref_grads = jax.jit(jax.value_and_grad(loss))(params, images, ids)
        mesh, rules = make_mesh({"fsdp": 8}), fsdp()
        rows = NamedSharding(mesh, logical_to_spec(("batch",), rules))
        with use_rules(mesh, rules):
            step = jax.jit(jax.value_and_grad(loss))
            args = (params, jax.device_put(images, rows), jax.device_put(ids, rows))
            hlo = step.lower(*args).compile().as_text()
            value, grads = step(*args)
        assert abs(float(value) - float(ref)) <= 1e-5 * abs(float(ref)), (value, ref)
        for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=2e-5, rtol=1e-4)
        assert re.search(r"f32\\[8,64\\]", hlo) and not re.search(r"f32\\[64,64\\]", hlo)
        print("OK")
        """
    )
    assert "OK" in out


def test_bfloat16_towers_keep_float32_parameters():
    """`config.model.dtype="bfloat16"`: matmuls in bf16, float32 parameters and loss, close to f32."""
    import jax
    from flax import nnx

    from pathor1_jax.models import clip
    from pathor1_jax.train.clip_stage import base_clip_config, contrastive_loss, model_options

    config = base_clip_config()
    config.model.dtype = "bfloat16"
    rng = np.random.default_rng(1)
    images = jnp.asarray(rng.normal(size=(8, 56, 56, 3)), jnp.float32)
    ids = jnp.asarray(rng.integers(1, 49407, size=(8, 77)), jnp.int32)
    bf16 = clip.CLIPModel(clip.tiny_config(), rngs=nnx.Rngs(0), **model_options(config.model))
    f32 = clip.CLIPModel(clip.tiny_config(), rngs=nnx.Rngs(0))
    assert {x.dtype for x in jax.tree.leaves(nnx.state(bf16, nnx.Param))} == {jnp.dtype(jnp.float32)}
    assert bf16.encode_image(images).dtype == jnp.bfloat16
    loss = jax.jit(contrastive_loss)(bf16, images, ids)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(float(loss), float(jax.jit(contrastive_loss)(f32, images, ids)), rtol=2e-2)

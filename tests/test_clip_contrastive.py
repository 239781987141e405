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

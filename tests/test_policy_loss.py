"""Fused clipped policy loss: hand-computed surrogate values and tiled (chunked / Pallas interpret)
implementations against the plain-jnp reference, forward and gradients; on a GPU (`gpu` marker)
`auto` is the chunked path, compiled, equal to xla at Qwen's vocabulary."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pathor1_jax.kernels import policy_loss
from pathor1_jax.kernels.policy_loss import (
    clipped_policy_loss,
    clipped_policy_loss_reference,
    clipped_surrogate,
    token_logprobs,
)

TOL = 1e-5
EPS_LOW, EPS_HIGH = 0.2, 0.28  # DAPO


def max_rel_err(x: jax.Array, ref: jax.Array) -> float:
    """Max absolute error relative to the reference's largest magnitude."""
    return float(jnp.max(jnp.abs(x - ref)) / jnp.max(jnp.abs(ref)))


# ------------------------------------------------------------------------------- hand-computed


def surrogate_1x3(advantage, ref_minus_logp=None, beta=0.0):
    """Ratios 0.5 (below 1 - 0.2), 1.1 (inside), 1.5 (above 1 + 0.28)."""
    logp = jnp.zeros((1, 3))
    old = -jnp.log(jnp.array([[0.5, 1.1, 1.5]]))
    ref = None if ref_minus_logp is None else jnp.asarray([ref_minus_logp])
    return clipped_surrogate(
        logp,
        old,
        jnp.array([advantage]),
        jnp.ones((1, 3)),
        eps_low=EPS_LOW,
        eps_high=EPS_HIGH,
        ref_logprobs=ref,
        beta=beta,
    )


def test_surrogate_positive_advantage_by_hand():
    # A = 2: min(r A, clip(r) A) = min(1.0, 1.6), 2.2, min(3.0, 2.56) -> loss = -(1 + 2.2 + 2.56) / 3
    loss, metrics = surrogate_1x3(2.0)
    np.testing.assert_allclose(loss, -(1.0 + 2.2 + 2.56) / 3, rtol=1e-6)
    np.testing.assert_allclose(metrics["clip_fraction"], 1 / 3, rtol=1e-6)  # only r = 1.5 is clipped
    np.testing.assert_allclose(metrics["mean_ratio"], 3.1 / 3, rtol=1e-6)
    assert float(metrics["kl"]) == 0.0


def test_surrogate_negative_advantage_by_hand():
    # A = -1: min(-0.5, -0.8), -1.1, min(-1.5, -1.28) -> loss = (0.8 + 1.1 + 1.5) / 3
    loss, metrics = surrogate_1x3(-1.0)
    np.testing.assert_allclose(loss, (0.8 + 1.1 + 1.5) / 3, rtol=1e-6)
    np.testing.assert_allclose(metrics["clip_fraction"], 1 / 3, rtol=1e-6)  # only r = 0.5 is clipped


def test_surrogate_k3_kl_by_hand():
    # k3(x) = e^x - x - 1 at x = ref - logp = 0, ln 2, -ln 2: 0, 1 - ln 2, ln 2 - 1/2 (sum 1/2)
    ln2 = math.log(2.0)
    loss, metrics = surrogate_1x3(2.0, ref_minus_logp=[0.0, ln2, -ln2], beta=0.1)
    np.testing.assert_allclose(metrics["kl"], 0.5 / 3, rtol=1e-6)
    np.testing.assert_allclose(loss, -(1.0 + 2.2 + 2.56) / 3 + 0.1 * 0.5 / 3, rtol=1e-6)


def test_aggregation_modes_by_hand():
    # ratio 1 everywhere, so each response token's objective is its sequence's advantage.
    mask = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    args = (jnp.zeros((3, 3)), jnp.zeros((3, 3)), jnp.array([1.0, 3.0, 5.0]), mask)
    token_mean, _ = clipped_surrogate(*args, eps_low=0.2, eps_high=0.2, agg="token-mean")
    seq_mean, _ = clipped_surrogate(*args, eps_low=0.2, eps_high=0.2, agg="seq-mean-token-mean")
    np.testing.assert_allclose(token_mean, -(1 + 1 + 3) / 3, rtol=1e-6)  # DAPO Eq. 2
    np.testing.assert_allclose(
        seq_mean, -((1 + 1) / 2 + 3 / 1) / 2, rtol=1e-6
    )  # GRPO Eq. 1, empty row skipped


# --------------------------------------------------------------------------- parity (tiled)

B, T, D, V = 3, 5, 16, 100  # V is not a multiple of the 32-wide vocabulary tile


@pytest.fixture(scope="module")
def batch():
    ks = jax.random.split(jax.random.key(0), 5)
    hidden = jax.random.normal(ks[0], (B, T, D))
    lm_head = 0.3 * jax.random.normal(ks[1], (D, V))
    tokens = jax.random.randint(ks[2], (B, T), 0, V)
    logp = token_logprobs(hidden, lm_head, tokens, impl="xla")
    # old log-probs put ratios in [0.55, 1.82]: inside and outside both clip bounds.
    old = logp + jax.random.uniform(ks[3], (B, T), minval=-0.6, maxval=0.6)
    ref = logp + 0.3 * jax.random.normal(ks[4], (B, T))
    advantages = jnp.array([1.5, -0.7, 0.0])
    mask = jnp.array([[0, 1, 1, 1, 1], [0, 0, 1, 1, 0], [1, 1, 1, 1, 1]], jnp.float32)
    ratio = np.exp(np.asarray(logp - old))[np.asarray(mask) > 0]
    assert (ratio < 1 - EPS_LOW).any() and (ratio > 1 + EPS_HIGH).any()
    assert ((ratio > 1 - EPS_LOW) & (ratio < 1 + EPS_HIGH)).any()
    return hidden, lm_head, tokens, old, ref, advantages, mask


@pytest.fixture
def small_tiles(monkeypatch):
    """8-row x 32-vocab Pallas tiles (15 rows padded to 16) over 64-column chunks, 32-column XLA
    chunks: V = 100 makes the last chunk overlap the one before (columns 36-99 with 36-63 masked,
    or 68-99 with 68-95 masked); Pallas interpreted."""
    monkeypatch.setenv("PATHOR1_PALLAS_INTERPRET", "1")
    monkeypatch.setattr(policy_loss, "pallas_tiles", lambda *a: policy_loss.Tiles(8, 32, 8, 32))
    monkeypatch.setattr(policy_loss, "CHUNKED_VOCAB_TILE", 32)
    monkeypatch.setattr(policy_loss, "PALLAS_VOCAB_CHUNK", 64)


@pytest.mark.parametrize("impl", ["chunked", "pallas"])
def test_token_logprobs_match_reference(batch, impl, small_tiles):
    hidden, lm_head, tokens = batch[:3]
    cotangent = jax.random.normal(jax.random.key(1), (B, T))

    def tiled(h, w):
        return token_logprobs(h, w, tokens, impl=impl)

    out, vjp = jax.vjp(tiled, hidden, lm_head)
    ref, ref_vjp = jax.vjp(lambda h, w: token_logprobs(h, w, tokens, impl="xla"), hidden, lm_head)
    assert max_rel_err(out, ref) <= TOL
    for grad, ref_grad in zip(vjp(cotangent), ref_vjp(cotangent), strict=True):
        assert max_rel_err(grad, ref_grad) <= TOL
    # with `valid`: 0 elsewhere; the chunked impl computes only the valid positions (gathered)
    valid = batch[-1] > 0
    out, vjp = jax.vjp(lambda h, w: token_logprobs(h, w, tokens, impl=impl, valid=valid), hidden, lm_head)
    assert max_rel_err(out, jnp.where(valid, ref, 0.0)) <= TOL
    assert np.all(np.asarray(out)[~np.asarray(valid)] == 0)
    masked = jnp.where(valid, cotangent, 0.0)
    for grad, ref_grad in zip(vjp(cotangent), ref_vjp(masked), strict=True):
        assert max_rel_err(grad, ref_grad) <= TOL


@pytest.mark.parametrize(
    ("impl", "agg", "beta"),
    [("pallas", "token-mean", 0.0), ("pallas", "seq-mean-token-mean", 0.04), ("chunked", "token-mean", 0.04)],
)
def test_policy_loss_and_grads_match_reference(batch, impl, agg, beta, small_tiles):
    hidden, lm_head, tokens, old, ref, advantages, mask = batch
    kwargs = dict(eps_low=EPS_LOW, eps_high=EPS_HIGH, ref_logprobs=ref, beta=beta, agg=agg)

    def fused(h, w):
        return clipped_policy_loss(h, w, tokens, old, advantages, mask, impl=impl, **kwargs)

    def reference(h, w):
        return clipped_policy_loss_reference(h, w, tokens, old, advantages, mask, **kwargs)

    (loss, metrics), grads = jax.value_and_grad(fused, argnums=(0, 1), has_aux=True)(hidden, lm_head)
    (ref_loss, ref_metrics), ref_grads = jax.value_and_grad(reference, argnums=(0, 1), has_aux=True)(
        hidden, lm_head
    )
    assert abs(float(loss - ref_loss)) <= TOL * abs(float(ref_loss))
    for key in ("clip_fraction", "mean_ratio", "kl"):
        np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=TOL)
    assert 0.0 < float(metrics["clip_fraction"]) < 1.0
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert max_rel_err(grad, ref_grad) <= TOL
    # Masked tokens and the zero-advantage sequence give no gradient unless KL is on.
    dh = np.asarray(grads[0])
    assert np.all(dh[np.asarray(mask) == 0] == 0)
    if beta == 0.0:
        assert np.all(dh[2] == 0)


def test_bad_inputs_raise(batch):
    hidden, lm_head, tokens, old, _, advantages, mask = batch
    with pytest.raises(ValueError, match="unknown agg 'sum'"):
        clipped_policy_loss(
            hidden, lm_head, tokens, old, advantages, mask, eps_low=0.2, eps_high=0.2, agg="sum"
        )
    with pytest.raises(ValueError, match=r"advantages \(3, 5\) must be \[B\]"):
        clipped_policy_loss(hidden, lm_head, tokens, old, old, mask, eps_low=0.2, eps_high=0.2)
    with pytest.raises(ValueError, match="unknown impl 'fused'"):
        token_logprobs(hidden, lm_head, tokens, impl="fused")
    with pytest.raises(ValueError, match="lm_head"):
        token_logprobs(hidden, lm_head.T, tokens)
    with pytest.raises(ValueError, match="impl 'pallas' needs a TPU"):
        token_logprobs(hidden, lm_head, tokens, impl="pallas")


@pytest.mark.gpu
def test_auto_on_gpu_is_chunked_and_matches_xla():
    """The Pallas kernels are Mosaic (TPU) only: on a GPU `auto` runs the chunked path (recorded
    while tracing), which equals xla at V = 151,936 (19 tiles of 8192, the last overlapping) within
    1e-4 of the largest magnitude (float32, GPU summation order); `pallas` is refused."""
    from pathor1_jax.kernels.platform import recording_impls

    b, t, d, v = 4, 32, 64, 151_936
    ks = jax.random.split(jax.random.key(2), 5)
    hidden = jax.random.normal(ks[0], (b, t, d))
    lm_head = 0.1 * jax.random.normal(ks[1], (d, v))
    tokens = jax.random.randint(ks[2], (b, t), 0, v)
    old = token_logprobs(hidden, lm_head, tokens, impl="xla") + 0.3 * jax.random.normal(ks[3], (b, t))
    advantages, mask = jax.random.normal(ks[4], (b,)), jnp.ones((b, t)).at[:, :4].set(0.0)

    def loss(impl, h, w):
        return clipped_policy_loss(
            h, w, tokens, old, advantages, mask, eps_low=EPS_LOW, eps_high=EPS_HIGH, impl=impl
        )

    with recording_impls() as impls:
        (value, metrics), grads = jax.jit(
            jax.value_and_grad(lambda h, w: loss("auto", h, w), argnums=(0, 1), has_aux=True)
        )(hidden, lm_head)
    assert impls == {"policy_loss": {"chunked"}}
    (ref, ref_metrics), ref_grads = jax.jit(
        jax.value_and_grad(lambda h, w: loss("xla", h, w), argnums=(0, 1), has_aux=True)
    )(hidden, lm_head)
    assert abs(float(value - ref)) <= 1e-4 * abs(float(ref))
    np.testing.assert_allclose(metrics["clip_fraction"], ref_metrics["clip_fraction"], rtol=1e-4)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert max_rel_err(grad, ref_grad) <= 1e-4
    with pytest.raises(ValueError, match="impl 'pallas' needs a TPU target .* 'gpu'"):
        token_logprobs(hidden, lm_head, tokens, impl="pallas")


# ------------------------------------------------------------------------------ temperature

TEMPERATURE = 0.7


@pytest.mark.parametrize("impl", ["xla", "chunked", "pallas"])
def test_temperature_log_probs_and_loss_match_the_tempered_softmax(batch, impl, small_tiles):
    # log π_T(y) = log_softmax(h·W / T)[y], computed here in float64 numpy; the loss and its gradients
    # at T = 0.7 against the jnp reference fed pre-divided hidden states.
    hidden, lm_head, tokens, old, ref, advantages, mask = batch
    logits = np.asarray(hidden, np.float64) @ np.asarray(lm_head, np.float64) / TEMPERATURE
    logits -= logits.max(-1, keepdims=True)
    expected = np.take_along_axis(
        logits - np.log(np.exp(logits).sum(-1, keepdims=True)), np.asarray(tokens)[..., None], -1
    )[..., 0]
    out = token_logprobs(hidden, lm_head, tokens, temperature=TEMPERATURE, impl=impl)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(out, token_logprobs(hidden, lm_head, tokens, impl="xla"), atol=1e-3)
    kwargs = dict(eps_low=EPS_LOW, eps_high=EPS_HIGH, ref_logprobs=ref, beta=0.04, agg="seq-mean-token-mean")

    def fused(h, w):
        return clipped_policy_loss(
            h, w, tokens, old, advantages, mask, temperature=TEMPERATURE, impl=impl, **kwargs
        )

    def reference(h, w):
        return clipped_policy_loss_reference(h / TEMPERATURE, w, tokens, old, advantages, mask, **kwargs)

    (loss, _), grads = jax.value_and_grad(fused, argnums=(0, 1), has_aux=True)(hidden, lm_head)
    (ref_loss, _), ref_grads = jax.value_and_grad(reference, argnums=(0, 1), has_aux=True)(hidden, lm_head)
    assert abs(float(loss - ref_loss)) <= TOL * abs(float(ref_loss))
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert max_rel_err(grad, ref_grad) <= TOL
    with pytest.raises(ValueError, match="temperature must be > 0"):
        token_logprobs(hidden, lm_head, tokens, temperature=0.0)


@pytest.mark.parametrize("chip", ["v5e", "v5p", "v6e"])
@pytest.mark.parametrize(
    ("d", "head"), [(2048, jnp.bfloat16), (2048, jnp.float32), (3584, jnp.bfloat16), (3584, jnp.float32)]
)
def test_pallas_tiles_fit_the_chips_vmem(chip, d, head):
    """At the RL configs' widths and head dtypes every kernel's VMEM need fits its limit: the chip's
    default scoped VMEM, or a raised limit within half the chip's VMEM (the Mosaic compile of
    these tiles is in test_kernels_tpu.py)."""
    chip_info = policy_loss._chips()[chip]
    tiles = policy_loss.pallas_tiles(chip, d, jnp.bfloat16, head)
    itemsize = jnp.dtype(head).itemsize  # bf16 hidden states are promoted to the head's dtype
    shapes = {
        "fwd": (tiles.rows, tiles.vocab),
        "dh": (tiles.rows, tiles.vocab),
        "dw": (tiles.dw_rows, tiles.dw_vocab),
    }
    for (kernel, shape), limit in zip(shapes.items(), tiles.vmem_limits, strict=True):
        need = policy_loss.vmem_bytes(kernel, *shape, d, itemsize, itemsize)
        assert need <= (limit or chip_info.scoped_vmem), (kernel, need, limit)
        assert limit is None or chip_info.scoped_vmem < limit <= chip_info.vmem // 2
    assert min(tiles.vocab, tiles.dw_vocab) >= 128 and tiles.vocab % 128 == tiles.dw_vocab % 128 == 0


SHARDED = r"""
import os
os.environ["PATHOR1_PALLAS_INTERPRET"] = "1"
import jax, jax.numpy as jnp
jax.config.update("jax_default_matmul_precision", "highest")
from pathor1_jax.kernels import policy_loss
from pathor1_jax.kernels.policy_loss import Tiles, clipped_policy_loss
from pathor1_jax.logical import use_rules
from pathor1_jax.sharding.mesh import make_mesh
from pathor1_jax.sharding.rules import preset

policy_loss.pallas_tiles = lambda *a: Tiles(8, 32, 8, 32)
policy_loss.PALLAS_VOCAB_CHUNK = 64
ks = jax.random.split(jax.random.key(0), 5)
B, T, D, V = 8, 5, 16, 200
hidden = jax.random.normal(ks[0], (B, T, D))
lm_head = 0.3 * jax.random.normal(ks[1], (D, V))
tokens = jax.random.randint(ks[2], (B, T), 0, V)
old = jax.random.normal(ks[3], (B, T)) - 5.0
adv = jax.random.normal(ks[4], (B,))
mask = jnp.ones((B, T)).at[:, 0].set(0.0)

def loss(impl, h, w):
    return clipped_policy_loss(h, w, tokens, old, adv, mask, eps_low=0.2, eps_high=0.28, impl=impl)[0]

ref, ref_grads = jax.value_and_grad(lambda h, w: loss("xla", h, w), argnums=(0, 1))(hidden, lm_head)
mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
# fsdp_tp: rows over data x fsdp, head chunks gathered over fsdp, vocabulary split over tensor;
# fsdp: rows over all three axes, dW reduce-scattered over fsdp and summed over data x tensor.
for rules in ("fsdp_tp", "fsdp"):
    with use_rules(mesh, preset(rules)):
        fn = lambda h, w: loss("pallas", h, w)
        assert "shard_map" in str(jax.make_jaxpr(fn)(hidden, lm_head))
        out, grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(hidden, lm_head)
    pairs = zip((out, *grads), (ref, *ref_grads))
    errs = [float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in pairs]
    print(rules, "max_rel_errs", errs)
    assert max(errs) <= 1e-5, (rules, errs)
"""


@pytest.mark.multidevice
def test_pallas_policy_loss_under_mesh_runs_per_shard():
    """Under `use_rules` the kernels run in shard_map on 8 devices and equal the unsharded reference."""
    from multidevice import run_on_8_devices

    out = run_on_8_devices(SHARDED)
    assert "fsdp_tp max_rel_errs" in out and "fsdp max_rel_errs" in out

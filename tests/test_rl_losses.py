"""GRPO (Eq. 1) and DAPO (Eq. 2) losses: values and gradients on hand-computed tensors.

The LM head is the identity (D = V = 4), so the hidden states are the logits and
d logp_t / d h_t = onehot(y_t) − softmax(h_t). Old log-probs are set to logp − log(r) so that the
ratios r = π_θ / π_old are exactly the chosen values, inside and outside each clip bound.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pathor1_jax.rl.losses import dapo_loss, grpo_loss, k3_kl

IMPLS = ["xla", "chunked"]
V = 4


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def make_inputs(ratios, seed=0):
    """hidden `[B, T, V]` logits, identity head, tokens, and old log-probs giving `ratios` `[B, T]`."""
    ratios = np.asarray(ratios, np.float64)
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(*ratios.shape, V))
    tokens = rng.integers(0, V, size=ratios.shape)
    logp = np.take_along_axis(log_softmax(hidden), tokens[..., None], -1)[..., 0]
    old = logp - np.log(ratios)
    return hidden, np.eye(V), tokens, logp, old


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def hidden_grad(hidden, tokens, dloss_dlogp):
    """Chain rule through log-softmax with the identity head: g · (onehot(y) − softmax(h))."""
    return dloss_dlogp[..., None] * (np.eye(V)[tokens] - softmax(hidden))


def as_jnp(*xs):
    return [jnp.asarray(x, jnp.float32) if np.asarray(x).dtype.kind == "f" else jnp.asarray(x) for x in xs]


# Two responses of one group (G = 2), three real tokens and one padding token each.
# ratios: 1.1 is inside both clip ranges; 1.25 is inside DAPO's [0.8, 1.28] but above GRPO's 1.2;
# 1.5 is above both; 0.5 is below both; the padding token has a wild ratio that must not count.
RATIOS = [[1.1, 1.5, 0.5, 9.0], [1.1, 1.5, 0.5, 9.0]]
MASK = [[1, 1, 1, 0], [1, 1, 1, 0]]
ADV = [1.0, -1.0]


@pytest.mark.parametrize("impl", IMPLS)
def test_dapo_loss_value_and_gradient(impl):
    hidden, head, tokens, _, old = make_inputs(RATIOS)
    # per-token objective min(r·A, clip(r, 0.8, 1.28)·A):
    #   A = +1: 1.1, min(1.5, 1.28) = 1.28 (clipped), min(0.5, 0.8) = 0.5
    #   A = −1: −1.1, min(−1.5, −1.28) = −1.5, min(−0.5, −0.8) = −0.8 (clipped)
    objective = np.array([1.1, 1.28, 0.5, -1.1, -1.5, -0.8])
    expected = -objective.sum() / 6  # token mean over the group's 6 real tokens
    # d objective / d logp = r·A where the unclipped term is taken, 0 where the clip removes it
    dobj = np.array([[1.1, 0.0, 0.5, 0.0], [-1.1, -1.5, 0.0, 0.0]])

    def loss_fn(h):
        return dapo_loss(
            h, *as_jnp(head, tokens, old, ADV, MASK), group_size=2, eps_low=0.2, eps_high=0.28, impl=impl
        )

    (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(jnp.asarray(hidden, jnp.float32))
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(metrics["clip_fraction"]) == pytest.approx(2 / 6)
    np.testing.assert_allclose(grad, hidden_grad(hidden, tokens, -dobj / 6), atol=1e-6)
    assert not np.any(np.asarray(grad)[:, 3])  # padding tokens get no gradient


@pytest.mark.parametrize("impl", IMPLS)
def test_grpo_loss_value_gradient_and_k3_kl(impl):
    ratios = [[1.1, 1.25, 0.5, 9.0], [1.1, 1.5, 0.7, 9.0]]
    mask = [[1, 1, 1, 0], [1, 1, 0, 0]]  # second response has two tokens
    hidden, head, tokens, logp, old = make_inputs(ratios, seed=1)
    delta = np.log(2.0)  # ref − logp = ln 2 on every token: k3 = 2 − ln 2 − 1
    ref = logp + delta
    beta = 0.04
    kl = 1.0 - math.log(2.0)
    # ε = 0.2:  A = +1: 1.1, min(1.25, 1.2) = 1.2 (clipped), min(0.5, 0.8) = 0.5
    #           A = −1: −1.1, min(−1.5, −1.2) = −1.5
    seq0 = np.mean([1.1 - beta * kl, 1.2 - beta * kl, 0.5 - beta * kl])
    seq1 = np.mean([-1.1 - beta * kl, -1.5 - beta * kl])
    expected = -(seq0 + seq1) / 2
    # d(−β·k3)/d logp = −β(1 − e^(ref − logp)) = −β(1 − 2) = β
    dsurr = np.array([[1.1, 0.0, 0.5, 0.0], [-1.1, -1.5, 0.0, 0.0]])
    dobj = (dsurr + beta) * np.asarray(mask)
    dloss = -dobj / np.array([[3.0], [2.0]]) / 2

    def loss_fn(h):
        return grpo_loss(h, *as_jnp(head, tokens, old, ADV, mask, ref), epsilon=0.2, beta=beta, impl=impl)

    (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(jnp.asarray(hidden, jnp.float32))
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(metrics["kl"]) == pytest.approx(kl, rel=1e-5)
    np.testing.assert_allclose(grad, hidden_grad(hidden, tokens, dloss), atol=1e-6)


def test_grpo_without_kl_needs_no_reference_and_with_kl_does():
    hidden, head, tokens, _, old = make_inputs(RATIOS)
    args = as_jnp(hidden, head, tokens, old, ADV, MASK)
    loss, metrics = grpo_loss(*args, None, epsilon=0.2, beta=0.0, impl="xla")
    # ε = 0.2: A = +1: 1.1, 1.2, 0.5; A = −1: −1.1, −1.5, −0.8
    assert float(loss) == pytest.approx(-((1.1 + 1.2 + 0.5) / 3 + (-1.1 - 1.5 - 0.8) / 3) / 2, rel=1e-5)
    assert float(metrics["kl"]) == 0.0
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(*args, None, epsilon=0.2, beta=0.04, impl="xla")


def test_k3_kl_values():
    logp = jnp.array([-1.0, -2.0, -0.5])
    ref = jnp.array([-1.0, -2.0 + math.log(2.0), -0.5 - math.log(2.0)])
    np.testing.assert_allclose(k3_kl(logp, ref), [0.0, 1 - math.log(2), 0.5 + math.log(2) - 1], rtol=1e-6)


def test_dapo_averages_per_group_token_means():
    # Two groups of G = 2 with 4 and 1 real tokens: Eq. 2 is the mean over groups of each group's
    # token mean, not the batch token mean. All ratios 1 inside the clip → objective = A per token.
    ratios = np.ones((4, 2))
    mask = np.array([[1, 1], [1, 1], [1, 0], [0, 0]])
    adv = np.array([1.0, -0.5, 2.0, -2.0])
    hidden, head, tokens, _, old = make_inputs(ratios, seed=2)
    loss, _ = dapo_loss(*as_jnp(hidden, head, tokens, old, adv, mask), group_size=2, impl="xla")
    group0 = (1.0 + 1.0 - 0.5 - 0.5) / 4
    group1 = 2.0 / 1
    assert float(loss) == pytest.approx(-(group0 + group1) / 2, rel=1e-5)


def test_the_three_aggregations_by_hand():
    # Groups of G = 2 with 4, 1 and 0 real tokens (the last: padding of a short batch); all ratios 1,
    # so each token's objective is its sequence's advantage.
    ratios = np.ones((6, 2))
    mask = np.array([[1, 1], [1, 1], [1, 0], [0, 0], [0, 0], [0, 0]])
    adv = np.array([1.0, -0.5, 2.0, -2.0, 7.0, 7.0])
    hidden, head, tokens, _, old = make_inputs(ratios, seed=3)
    args = as_jnp(hidden, head, tokens, old, adv, mask)
    expected = {
        "group-mean-token-mean": ((1 + 1 - 0.5 - 0.5) / 4 + 2.0) / 2,  # Eq. 2, per group
        "token-mean": (1 + 1 - 0.5 - 0.5 + 2.0) / 5,  # verl: every token of the mini-batch pooled
        "seq-mean-token-mean": (1.0 - 0.5 + 2.0) / 3,  # Eq. 1: responses without tokens skipped
    }
    for agg, value in expected.items():
        dapo, _ = dapo_loss(*args, group_size=2, agg=agg, impl="xla")
        grpo, _ = grpo_loss(*args, None, epsilon=0.2, beta=0.0, group_size=2, agg=agg, impl="xla")
        assert float(dapo) == pytest.approx(-value, rel=1e-5), agg
        assert float(grpo) == pytest.approx(-value, rel=1e-5), agg
    with pytest.raises(ValueError, match="not whole groups of group_size=4"):
        dapo_loss(*args, group_size=4, impl="xla")


@pytest.mark.parametrize("impl", IMPLS)
def test_dual_clip_by_hand(impl):
    # A = −1 with ratios 0.5, 1.1, 5.0: min(rA, clip(r)A) = −0.8, −1.1, −5.0; a dual clip c = 3
    # raises the last to c·A = −3 and takes its gradient away. A = +1 is never dual-clipped.
    ratios = [[0.5, 1.1, 5.0], [0.5, 1.1, 5.0]]
    hidden, head, tokens, logp, old = make_inputs(ratios, seed=4)
    args = as_jnp(hidden, head, tokens, old, [-1.0, 1.0], np.ones((2, 3)))

    def loss(h, dual_clip):
        return dapo_loss(h, *args[1:], group_size=1, agg="token-mean", dual_clip=dual_clip, impl=impl)

    off, _ = loss(args[0], None)
    on, metrics = loss(args[0], 3.0)
    positive = 0.5 + 1.1 + 1.28  # A = +1: r = 0.5 unclipped (min), 1.1, clip(5.0) = 1.28
    assert float(off) == pytest.approx(-(-0.8 - 1.1 - 5.0 + positive) / 6, rel=1e-5)
    assert float(on) == pytest.approx(-(-0.8 - 1.1 - 3.0 + positive) / 6, rel=1e-5)
    assert float(metrics["dual_clip_fraction"]) == pytest.approx(1 / 6)
    grad = np.asarray(jax.grad(lambda h: loss(h, 3.0)[0])(args[0]))
    # d(−obj)/d logp per token: −A·r where the unclipped term is active; 0 where clipped or dual-clipped
    dlogp = np.array([[0.0, 1.1, 0.0], [-0.5, -1.1, 0.0]]) / 6
    np.testing.assert_allclose(grad, hidden_grad(hidden, tokens, dlogp), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        loss(args[0], 1.0)

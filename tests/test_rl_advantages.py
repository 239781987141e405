"""Group-relative advantages and DAPO's dynamic-sampling bookkeeping."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from pathor1_jax.rl.advantages import group_advantages
from pathor1_jax.rl.dynamic_sampling import fill_batch, is_informative


def test_all_equal_groups_give_exact_zeros():
    rewards = jnp.array([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [-1.0, -1.0, -1.0, -1.0], [0.3] * 4])
    adv = group_advantages(rewards)
    assert np.all(np.isfinite(adv))
    np.testing.assert_array_equal(adv, np.zeros((4, 4)))


def test_single_sample_group_gives_zero():
    np.testing.assert_array_equal(group_advantages(jnp.array([[0.7]])), [[0.0]])


def test_hand_computed_advantages():
    # [1, 0, 0, 0]: mean 1/4, population std sqrt(3)/4 → A = (3/4)/(√3/4) = √3, (−1/4)/(√3/4) = −1/√3.
    # [1, -1]: mean 0, std 1 → A = ±1.  [1, 0.5, 0]: mean 0.5, std sqrt(1/6) → ±√6/2, 0.
    adv = group_advantages(jnp.array([[1.0, 0.0, 0.0, 0.0]]), eps=0.0)
    np.testing.assert_allclose(
        adv, [[math.sqrt(3), -1 / math.sqrt(3), -1 / math.sqrt(3), -1 / math.sqrt(3)]], rtol=1e-6
    )
    np.testing.assert_allclose(group_advantages(jnp.array([[1.0, -1.0]]), eps=0.0), [[1.0, -1.0]], rtol=1e-6)
    np.testing.assert_allclose(
        group_advantages(jnp.array([[1.0, 0.5, 0.0]]), eps=0.0),
        [[math.sqrt(6) / 2, 0.0, -math.sqrt(6) / 2]],
        rtol=1e-6,
        atol=1e-7,
    )
    # eps enters the denominator: std 1 → A = 1 / (1 + 0.5)
    np.testing.assert_allclose(
        group_advantages(jnp.array([[1.0, -1.0]]), eps=0.5), [[2 / 3, -2 / 3]], rtol=1e-6
    )


def test_unbiased_std_is_verls_by_hand():
    # [1, 0, 0, 0]: sample std (ddof 1) = sqrt((9/16 + 3/16) / 3) = 1/2 → A = 3/2, −1/2.
    # [1, -1]: sample std √2 → ±1/√2 (population gives ±1). [1, 0 × 7]: 2.4749, −0.3536 (verl).
    adv = group_advantages(jnp.array([[1.0, 0.0, 0.0, 0.0]]), eps=0.0, std="unbiased")
    np.testing.assert_allclose(adv, [[1.5, -0.5, -0.5, -0.5]], rtol=1e-6)
    pair = group_advantages(jnp.array([[1.0, -1.0]]), eps=0.0, std="unbiased")
    np.testing.assert_allclose(pair, [[0.5**0.5, -(0.5**0.5)]], rtol=1e-6)
    adv8 = group_advantages(jnp.array([[1.0] + [0.0] * 7]), eps=0.0, std="unbiased")
    np.testing.assert_allclose(adv8[0, :2], [7 / 8 / math.sqrt(1 / 8), -1 / 8 / math.sqrt(1 / 8)], rtol=1e-6)
    np.testing.assert_allclose(adv8[0, :2], [2.4749, -0.35355], rtol=1e-4)
    # all-equal and G = 1 groups stay exact zeros
    np.testing.assert_array_equal(group_advantages(jnp.array([[0.7]]), std="unbiased"), [[0.0]])
    np.testing.assert_array_equal(group_advantages(jnp.ones((2, 3)), std="unbiased"), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="advantage std"):
        group_advantages(jnp.ones((1, 2)), std="sample")


def test_groups_are_independent():
    rows = jnp.array([[1.0, 0.0, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0], [2.0, 4.0, 6.0, 8.0]])
    adv = group_advantages(rows)
    for i in range(3):
        np.testing.assert_allclose(adv[i], group_advantages(rows[i : i + 1])[0], rtol=1e-6)


def test_advantages_reject_flat_rewards():
    with pytest.raises(ValueError, match="num_groups, group_size"):
        group_advantages(jnp.ones(8))


class Prompts:
    """A stub sampler: group i has `correct[i]` correct responses out of G; records the calls."""

    def __init__(self, correct):
        self.correct = list(correct)
        self.next = 0
        self.calls = []

    def __call__(self, n):
        self.calls.append(n)
        out = [(self.next + k, self.correct[(self.next + k) % len(self.correct)]) for k in range(n)]
        self.next += n
        return out


def test_is_informative():
    assert [is_informative(k, 4) for k in range(5)] == [False, True, True, True, False]
    with pytest.raises(ValueError, match="outside"):
        is_informative(5, 4)


def test_fill_batch_fills_over_several_rounds_and_drops_0_and_g_groups():
    sampler = Prompts([0, 2, 4, 1, 4, 0, 3, 0])  # G = 4: groups 1, 3, 6 are informative
    kept, report = fill_batch(sampler, lambda g: g[1], batch_groups=4, group_size=4, max_rounds=10)
    assert [g[0] for g in kept] == [1, 3, 6, 9]  # group 9 has correct[9 % 8] = 2
    assert all(0 < g[1] < 4 for g in kept)
    assert sampler.calls == [4, 4, 4]  # same prompt count every round (one compiled rollout shape)
    assert report.rounds == 3 and report.batch_full
    assert report.groups_sampled == 12 and report.groups_kept == 4
    # groups 0, 2, 4, 5, 7, 8, 10 are filtered; informative group 11 is surplus, dropped but not "filtered"
    assert report.groups_filtered == 7
    assert report.filtered_fraction == pytest.approx(7 / 12)


def test_fill_batch_stops_after_max_rounds_when_the_batch_cannot_fill():
    sampler = Prompts([0, 4, 4, 2])  # one informative group per 4 prompts
    kept, report = fill_batch(sampler, lambda g: g[1], batch_groups=4, group_size=4, max_rounds=2)
    assert sampler.calls == [4, 4]
    assert [g[0] for g in kept] == [3, 7]
    assert not report.batch_full and report.rounds == 2 and report.groups_kept == 2
    assert report.filtered_fraction == pytest.approx(6 / 8)
    metrics = report.metrics()
    assert metrics["dynamic_sampling/filtered_fraction"] == pytest.approx(0.75)
    assert metrics["dynamic_sampling/batch_full"] == 0.0


def test_fill_batch_with_no_informative_group_returns_empty():
    kept, report = fill_batch(Prompts([0, 4]), lambda g: g[1], batch_groups=2, group_size=4, max_rounds=3)
    assert kept == [] and report.rounds == 3 and report.groups_filtered == 6 and not report.batch_full


def test_fill_batch_stops_as_soon_as_full():
    sampler = Prompts([1, 2, 3])
    kept, report = fill_batch(
        sampler, lambda g: g[1], batch_groups=2, group_size=4, max_rounds=5, prompts_per_round=3
    )
    assert sampler.calls == [3] and len(kept) == 2 and report.groups_filtered == 0 and report.rounds == 1

"""Rollouts and GRPO / DAPO steps of a tiny Qwen2.5-VL end to end (images included)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from pathor1_jax.models import qwen2_5_vl
from pathor1_jax.rl import rewards
from pathor1_jax.rl.rollout import (
    Prompt,
    Rollout,
    block_patches,
    concat_rollouts,
    fill_logprobs,
    minibatch_rows,
    pad_prompts,
    response_hidden,
    response_lengths,
    rollout,
    sample_images,
    sequence_inputs,
)
from pathor1_jax.rl.step import (
    LossConfig,
    RolloutSampler,
    ShortBatchError,
    apply_updates,
    pad_groups,
    rl_step,
)
from pathor1_jax.train.step import StepSpec, init_state

G, MAX_NEW, EOS, PAD = 4, 6, 151645, 151643


def make_prompts(config, n, seed=0):
    """Chat-like prompts with one 56×56 image each (grid 1×4×4: 16 patches, 4 image tokens)."""
    rng = np.random.default_rng(seed)
    image = [config.vision_start_token_id] + [config.image_token_id] * 4 + [config.vision_start_token_id + 1]
    prompts = []
    for i in range(n):
        text = rng.integers(100, 1000, size=1 + i % 3).tolist()
        ids = np.array([151644, 872, 198, *image, *text, 151645, 198, 151644, 77091, 198], np.int32)
        pixels = rng.normal(size=(16, 1176)).astype(np.float32)
        prompts.append(Prompt(ids, "ABCD"[i % 4], pixels, np.array([[1, 4, 4]])))
    return prompts


def decode_stub(ids):
    """Stands in for the tokenizer: the first sampled token picks the answer letter, so a random
    policy produces a mix of correct and wrong answers within a group."""
    return f"<think>t</think><answer>{'ABCD'[ids[0] % 4]}</answer>" if ids else ""


@pytest.fixture(scope="module")
def tiny():
    config = qwen2_5_vl.tiny_config()
    model = qwen2_5_vl.Qwen2_5_VLForConditionalGeneration(config, rngs=nnx.Rngs(0))
    return config, model


def test_response_lengths_and_prompt_padding():
    responses = np.array([[5, 7, EOS, PAD], [5, 5, 5, 5], [EOS, PAD, PAD, PAD]])
    lengths, truncated = response_lengths(responses, EOS)
    np.testing.assert_array_equal(lengths, [3, 4, 1])
    np.testing.assert_array_equal(truncated, [False, True, False])
    prompts = [Prompt(np.array([1, 2, 3]), "A"), Prompt(np.array([4]), "B")]
    ids, mask = pad_prompts(prompts, 2, PAD, multiple=4)
    np.testing.assert_array_equal(ids, [[PAD, 1, 2, 3]] * 2 + [[PAD, PAD, PAD, 4]] * 2)
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1]] * 2 + [[0, 0, 0, 1]] * 2)


def test_images_follow_their_samples(tiny):
    config, _ = tiny
    prompts = make_prompts(config, 3)
    pixels, grids = sample_images(prompts, np.array([0, 1, 2, 3, 4]), 2)  # prompts 0, 0, 1, 1, 2 (G = 2)
    expected = np.concatenate([prompts[k].pixel_values for k in (0, 0, 1, 1, 2)])
    np.testing.assert_array_equal(pixels, expected)
    assert grids.shape == (5, 3)


@pytest.mark.parametrize("images", [True, False])
def test_greedy_rollout_is_scored_by_the_same_forward(tiny, images):
    """Greedy responses must be the argmax of the log-prob forward at every response position:
    positions (M-RoPE with images, 1D without), images and masks of `sequence_inputs` agree with
    those `generate` used, with prompts of different lengths (left padding)."""
    config, model = tiny
    prompts = make_prompts(config, 2)
    if not images:
        prompts = [
            Prompt(np.array([151644, 872, 198, 300 + i, 400, 151645, 198] * (1 + i)), "A") for i in range(2)
        ]
    batch = rollout(
        model, prompts, group_size=2, max_new_tokens=MAX_NEW, decode=decode_stub,
        reward_fn=lambda text, answer, n: rewards.grpo_reward(text, answer), temperature=0.0,
    )  # fmt: skip
    assert batch.responses.shape == (4, MAX_NEW) and batch.rewards.shape == (2, 2)
    np.testing.assert_array_equal(batch.responses[0], batch.responses[1])  # greedy: the group agrees
    rows = np.arange(4)
    inputs = sequence_inputs(config, batch, rows, block_patches(batch.prompts, [rows], 2, 4))
    assert (inputs["pixel_values"] is None) == (not images)
    logits = model.logits(response_hidden(model, inputs))  # [B, R, V]
    mask = batch.response_mask.astype(bool)
    np.testing.assert_array_equal(np.asarray(logits.argmax(-1))[mask], batch.responses[mask])


def test_pad_groups_and_concat():
    def fake(n, offset):
        b = n * G
        return Rollout(
            prompts=[Prompt(np.arange(2 + i), "A") for i in range(n)],
            group_size=G,
            prompt_ids=np.full((b, 4), offset),
            prompt_mask=np.ones((b, 4), np.int32),
            responses=np.full((b, 3), offset),
            response_mask=np.ones((b, 3), np.int32),
            lengths=np.full(b, 3),
            truncated=np.zeros(b, bool),
            texts=["x"] * b,
            rewards=np.zeros((n, G), np.float32),
            correct=np.zeros((n, G), bool),
            formatted=np.ones((n, G), bool),
        )

    both = concat_rollouts([fake(1, 7), fake(2, 9)], PAD)
    assert both.num_groups == 3 and both.prompt_ids.shape == (12, 4)
    np.testing.assert_array_equal(both.responses[:, 0], [7] * 4 + [9] * 8)
    padded, real = pad_groups(fake(1, 7), 3)
    np.testing.assert_array_equal(real, [True, False, False])
    assert padded.num_groups == 3 and padded.response_mask[:G].all() and not padded.response_mask[G:].any()


def run_steps(config, model, algo, steps, mu, groups_per_minibatch, reward, short_batch="error"):
    tx = optax.adam(1e-3)
    graphdef, state = init_state(model, tx, 0)
    state["params"] = jax.tree.map(jnp.copy, state["params"])  # the updates donate the state
    spec = StepSpec(graphdef, tx)
    reference = nnx.merge(graphdef, jax.tree.map(jnp.copy, state["params"]))
    prompts = make_prompts(config, 16, seed=1)
    cursor = iter(range(10**6))

    def next_prompts(n):
        return [prompts[next(cursor) % len(prompts)] for _ in range(n)]

    def rollout_fn(model, ps, seed):
        return rollout(
            model,
            ps,
            group_size=G,
            max_new_tokens=MAX_NEW,
            decode=decode_stub,
            reward_fn=reward,
            temperature=1.0,
            seed=seed,
        )

    sampler = RolloutSampler(next_prompts, rollout_fn)
    cfg = LossConfig(algo=algo, group_size=G, impl="chunked")
    history = []
    for _ in range(steps):
        state, metrics = rl_step(
            spec,
            state,
            sampler,
            cfg,
            batch_groups=2,
            groups_per_minibatch=groups_per_minibatch,
            mu=mu,
            max_rounds=3,
            max_new_tokens=MAX_NEW,
            pad_token_id=PAD,
            reference=reference,
            short_batch=short_batch,
        )
        history.append(metrics)
    return state, history


def test_dapo_steps_with_dynamic_sampling(tiny):
    config, model = tiny
    state, history = run_steps(
        config,
        model,
        "dapo",
        steps=2,
        mu=2,
        groups_per_minibatch=1,
        reward=lambda text, answer, n: rewards.dapo_reward(text, answer, n, MAX_NEW, 2, variant="soft"),
        short_batch="train",
    )
    assert int(state["step"]) == sum(m.get("update/minibatches", 0) for m in history)
    for metrics in history:
        kept = metrics["dynamic_sampling/groups_kept"]
        assert metrics["dynamic_sampling/short_batch"] == float(kept < 2)
        assert all(np.isfinite(v) for v in metrics.values()), metrics
        assert 1 <= metrics["dynamic_sampling/rounds"] <= 3
        if kept:  # μ = 2 passes over `kept` mini-batches of one group each: none is padding only
            assert metrics["update/minibatches"] == 2 * kept
            assert metrics["update/minibatches_without_tokens"] == 0
            assert metrics["update/kl"] == 0.0


def uniform_rollout(n, correct):
    """A scored rollout of n prompts × G whose groups are all right or all wrong (never informative)."""
    b = n * G
    return Rollout(
        prompts=[Prompt(np.arange(3), "A") for _ in range(n)],
        group_size=G,
        prompt_ids=np.ones((b, 3), np.int32),
        prompt_mask=np.ones((b, 3), np.int32),
        responses=np.full((b, 2), EOS, np.int32),
        response_mask=np.array([[1, 0]] * b, np.int32),
        lengths=np.ones(b, np.int32),
        truncated=np.zeros(b, bool),
        texts=[""] * b,
        rewards=np.full((n, G), 1.0 if correct else -1.0, np.float32),
        correct=np.full((n, G), correct),
        formatted=np.ones((n, G), bool),
    )


def test_short_batch_error_names_rounds_prompts_and_groups(tiny):
    config, model = tiny
    tx = optax.adam(1e-3)
    graphdef, state = init_state(model, tx, 0)
    calls = []

    def sample(model, n):
        calls.append(n)
        return uniform_rollout(n, correct=len(calls) % 2 == 0)

    with pytest.raises(ShortBatchError) as err:
        rl_step(
            StepSpec(graphdef, tx),
            state,
            sample,
            LossConfig(algo="dapo", group_size=G),
            batch_groups=3,
            groups_per_minibatch=1,
            mu=1,
            max_rounds=2,
            max_new_tokens=MAX_NEW,
            pad_token_id=PAD,
        )
    message = str(err.value)
    assert "kept 0 of 3 groups after 2 rounds (rl.max_rounds=2): 6 prompts drawn, 6 groups" in message
    assert "rl.short_batch=train" in message
    assert err.value.metrics["dynamic_sampling/short_batch"] == 1.0
    assert err.value.metrics["dynamic_sampling/groups_sampled"] == 6.0
    assert calls == [3, 3]


def test_padding_only_minibatches_never_reach_the_optimizer(tiny):
    # Two mini-batches of one group: the first real, the second padding (no response token). The
    # state after both must be bit-identical to the state after the real one alone (AdamW would
    # move every weight on momentum alone), and the optimizer's step count must not advance.
    config, model = tiny
    tx = optax.adamw(1e-3)
    graphdef, state = init_state(model, tx, 0)
    spec, cfg = StepSpec(graphdef, tx), LossConfig(algo="dapo", group_size=G, impl="chunked")
    batch = rollout(
        model,
        make_prompts(config, 1),
        group_size=G,
        max_new_tokens=MAX_NEW,
        decode=decode_stub,
        reward_fn=lambda text, answer, n: 0.0,
        seed=3,
    )
    batch, real = pad_groups(batch, 2)
    fill_logprobs(model, batch, 1, impl="chunked")
    row_sets = minibatch_rows(2, G, 1)
    num_patches = block_patches(batch.prompts, row_sets, G, 4)
    inputs = [sequence_inputs(config, batch, rows, num_patches) for rows in row_sets]
    advantages = np.tile([1.0, -1.0], G)  # the padding group's rows have advantages too

    def fresh():  # the updates donate their state
        return jax.tree.map(jnp.copy, state)

    both, history, skipped = apply_updates(spec, cfg, fresh(), batch, advantages, row_sets, inputs, mu=2)
    assert (len(history), skipped, int(both["step"])) == (2, 2, 2)
    alone, _, _ = apply_updates(spec, cfg, fresh(), batch, advantages, row_sets[:1], inputs[:1], mu=2)
    for x, y in zip(jax.tree.leaves(both), jax.tree.leaves(alone), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    pad_only, history, skipped = apply_updates(
        spec, cfg, fresh(), batch, advantages, row_sets[1:], inputs[1:], mu=1
    )
    assert (history, skipped, int(pad_only["step"])) == ([], 1, 0)
    for x, y in zip(jax.tree.leaves(pad_only["params"]), jax.tree.leaves(state["params"]), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

"""`generate`'s pieces (`prefill`, then `decode` in chunks) with per-row sampling settings: the same
tokens as one `generate` call for the same seed, and per-row sampling rules."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pathor1_jax.models import qwen2_5_vl
from pathor1_jax.models.qwen2_5_vl import KVCache

steps = importlib.import_module("pathor1_jax.models.qwen2_5_vl.generate")


def test_per_row_sampling_rules():
    logits = jax.random.normal(jax.random.key(0), (4, 50)) * 3
    key = jax.random.key(1)
    greedy = jnp.argmax(logits, -1)
    same = steps.sample_token(logits, key, jnp.full((4,), 0.7), jnp.full((4,), 0.9))
    assert (np.asarray(same) == np.asarray(steps.sample_token(logits, key, 0.7, 0.9))).all()  # rows = scalar
    mixed = steps.sample_token(logits, key, jnp.array([0.0, 0.7, 0.0, 0.7]), jnp.array([1.0, 0.9, 0.5, 1e-6]))
    assert mixed[0] == greedy[0] and mixed[2] == greedy[2]  # temperature 0: greedy whatever top-p
    assert mixed[1] == same[1]  # same temperature, top-p and key: the same draw
    assert mixed[3] == greedy[3]  # a tiny top-p keeps only the most likely token
    unfiltered = steps.sample_token(logits, key, 0.7, None)
    assert (np.asarray(steps.sample_token(logits, key, jnp.full((4,), 0.7), jnp.ones(4))) == unfiltered).all()


def test_categorical_draws_what_jax_random_categorical_draws():
    """The sampler's Gumbel-max (unrolled Threefry bits, argmax by `top_k`) is `jax.random.categorical`
    bit for bit: the same bits for any shape, the same token for every key on a wide vocabulary,
    including rows whose best logits tie (the lowest index wins) and rows masked to -inf."""
    from pathor1_jax.models.threefry import as_unrolled

    for shape in [(1,), (7, 5), (3, 4, 5)]:
        key = jax.random.key(shape[0])
        assert (jax.random.bits(as_unrolled(key), shape) == jax.random.bits(key, shape)).all()
    assert (
        jax.random.bits(as_unrolled(jax.random.PRNGKey(3)), (9,))
        == jax.random.bits(jax.random.PRNGKey(3), (9,))
    ).all()
    logits = jax.random.normal(jax.random.key(0), (6, 30000)) * 4
    logits = logits.at[0].set(0.0).at[1, ::2].set(-jnp.inf)  # a row of ties; a half-masked row
    ours = jax.jit(jax.vmap(steps.categorical, in_axes=(0, None)))
    theirs = jax.jit(jax.vmap(lambda k, x: jax.random.categorical(k, x, axis=-1), in_axes=(0, None)))
    keys = jax.random.split(jax.random.key(7), 8)
    np.testing.assert_array_equal(ours(keys, logits), theirs(keys, logits))


def test_prefill_then_decode_chunks_equals_generate():
    model = qwen2_5_vl.Qwen2_5_VLForConditionalGeneration(
        qwen2_5_vl.tiny_config(num_hidden_layers=1), rngs=nnx.Rngs(0)
    )
    ids = np.random.default_rng(0).integers(0, 5000, (2, 7)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # left padding
    new = 6
    expected = qwen2_5_vl.generate(
        model, ids, mask, max_new_tokens=new, temperature=0.8, top_p=0.9, seed=5, eos_token_id=-1
    )
    x = steps.prompt_inputs(model.config, ids, mask)
    b = len(ids)
    state = steps.prefill(
        model,
        jnp.asarray(x["input_ids"]),
        jnp.asarray(x["attention_mask"]),
        None,
        None,
        jnp.asarray(x["position_ids"]),
        jax.random.key(5),
        jnp.array([new, 4], jnp.int32),  # the second row stops after 4 tokens
        jnp.full((b,), 0.8),
        jnp.full((b,), 0.9),
        max_len=ids.shape[1] + new,
    )
    chunks = []
    for _ in range(new // 2):
        state, tokens = steps.decode(
            model, state, num_steps=2, sample=True, nucleus=True, eos_token_id=-1, pad_token_id=0
        )
        chunks.append(np.asarray(tokens))
    got = np.concatenate(chunks, axis=1)
    np.testing.assert_array_equal(got[0], np.asarray(expected)[0])
    np.testing.assert_array_equal(got[1, :4], np.asarray(expected)[1, :4])
    assert (got[1, 4:] == 0).all() and bool(state.finished.all()) and int(state.step) == new


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
def test_a_decode_step_writes_its_slot_without_copying_the_cache(scan):
    """One decode step (one token a row, the cache donated), compiled for this host: no buffer the
    size of a layer's cache (or of all layers') is copied. Before, each layer's cache went into the
    layer loop as a scanned input and came out as a new stacked output: every token copied it all."""
    cfg = qwen2_5_vl.tiny_config(num_hidden_layers=3)
    lm = qwen2_5_vl.Qwen2_5_VLForConditionalGeneration(cfg, scan_layers=scan, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(lm.model.language_model)
    batch, slots = 4, 256

    def step(params, cache: KVCache, token):
        text = nnx.merge(graphdef, params)
        positions = jnp.broadcast_to(cache.index, (3, batch, 1))
        return text(text.embed_tokens(token[:, None]), positions, jnp.ones((batch, 1), jnp.int32), cache)

    cache = jax.eval_shape(lambda: KVCache.init(cfg.text, batch, slots, jnp.float32))
    hlo = jax.jit(step, donate_argnums=1).lower(params, cache, jnp.zeros((batch,), jnp.int32)).compile()
    layer_cache = ",".join(map(str, cache.keys.shape[1:])) + "]"  # [B, S, K, Dh], with or without L
    lines = hlo.as_text().splitlines()
    copies = [line for line in lines if " copy(" in line and layer_cache in line.split("copy(")[0]]
    assert not copies, copies[:2]

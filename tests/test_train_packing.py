"""On the tiny Qwen2.5-VL and real demo chats (with images): the per-token losses of a packed batch equal
those of the same samples unpacked, the chunked loss equals plain cross-entropy on the logits, and the
LM head computed only at labelled positions gives the loss and gradients of the head at every position."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pathor1_jax.data.demo import demo_records
from pathor1_jax.data.packing import pack_examples
from pathor1_jax.data.pipeline import ProcessorSpec, default_tokenizer_path, get_processor
from pathor1_jax.models import qwen2_5_vl
from pathor1_jax.train.lm import lm_nll, prepare_batch
from pathor1_jax.train.losses import IGNORE_INDEX, per_token_nll, shifted_targets, token_mean_loss

MAX_LEN, ROWS = 256, 3


@pytest.fixture(scope="module")
def setup():
    cfg = qwen2_5_vl.tiny_config()
    spec = ProcessorSpec(default_tokenizer_path(), min_pixels=56 * 56, max_pixels=56 * 56, rope_config=cfg)
    processor = get_processor(spec)
    examples = [processor.encode(r) for r in [c for c in demo_records("chat") if c.task == "MCQ"][:3]]
    kw = dict(
        batch_size=ROWS, max_len=MAX_LEN, pad_token_id=processor.pad_token_id, max_patches=64, max_images=4
    )
    (packed,) = pack_examples(examples, packing=True, **kw)
    (unpacked,) = pack_examples(examples, packing=False, **kw)
    model = qwen2_5_vl.Qwen2_5_VLForConditionalGeneration(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    @jax.jit
    def nll_and_logits(state, batch):
        model = nnx.merge(graphdef, state)
        nll, valid = lm_nll(model, batch, chunk=64)
        logits = model(
            batch["input_ids"],
            pixel_values=batch["pixel_values"],
            position_ids=batch["position_ids"],
            segment_ids=batch["segment_ids"],
            vision_index=batch["vision_index"],
        )
        return nll, valid, logits

    def run(batch):
        return jax.device_get(nll_and_logits(state, prepare_batch(batch, cfg)))

    return examples, packed, run(packed), unpacked, run(unpacked)


def per_sample_losses(batch: dict, nll: np.ndarray, valid: np.ndarray) -> list[np.ndarray]:
    """The valid per-token losses of each sample, samples in row-major order."""
    out = []
    for r in range(batch["segment_ids"].shape[0]):
        for s in range(1, batch["segment_ids"][r].max() + 1):
            where = (batch["segment_ids"][r] == s) & valid[r]
            out.append(nll[r][where])
    return out


def test_samples_really_are_packed(setup):
    examples, packed, _, unpacked, _ = setup
    assert packed["segment_ids"].max(axis=1).tolist() == [2, 1, 0]  # two samples share row 0
    assert unpacked["segment_ids"].max(axis=1).tolist() == [1, 1, 1]
    assert len(packed["image_grid_thw"][packed["image_grid_thw"].prod(-1) > 0]) == 3


def test_packed_and_unpacked_per_token_losses_are_equal(setup):
    examples, packed, (p_nll, p_valid, _), unpacked, (u_nll, u_valid, _) = setup
    packed_losses = per_sample_losses(packed, p_nll, p_valid)
    unpacked_losses = per_sample_losses(unpacked, u_nll, u_valid)
    assert len(packed_losses) == len(unpacked_losses) == 3
    for ex, a, b in zip(examples, packed_losses, unpacked_losses, strict=True):
        # every label except a sample's first token is a target (samples start with <|im_start|>)
        assert a.shape == b.shape == ((ex["labels"] != IGNORE_INDEX).sum(),)
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(token_mean_loss(p_nll, p_valid), token_mean_loss(u_nll, u_valid), rtol=1e-5)


def test_chunked_loss_matches_cross_entropy_of_the_logits(setup):
    _, _, _, unpacked, (nll, valid, logits) = setup
    labels = unpacked["labels"]
    for r in range(ROWS):  # HF: logits[t] predicts labels[t + 1]
        t = np.flatnonzero(labels[r, 1:] != IGNORE_INDEX)
        rows = logits[r, t].astype(np.float64)  # [n, V]
        log_z = rows.max(-1) + np.log(np.exp(rows - rows.max(-1, keepdims=True)).sum(-1))
        expected = log_z - rows[np.arange(len(t)), labels[r, t + 1]]
        np.testing.assert_array_equal(np.flatnonzero(valid[r]), t)
        np.testing.assert_allclose(nll[r, t], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("chunk", "groups"), [(16, 1), (64, ROWS), (1000, 1)])
def test_labelled_positions_only_gives_the_loss_and_gradients_of_every_position(setup, chunk, groups):
    """`lm_nll` computes the LM head only at labelled positions (gathered to the front of each block
    of rows: the whole batch, or each row; chunks past the largest block's count skipped);
    against `per_token_nll` without `valid` (the head at every position): equal per-token NLL, loss
    and gradient of every parameter (vision tower included)."""
    _, packed, *_ = setup
    cfg = qwen2_5_vl.tiny_config()
    batch = prepare_batch(packed, cfg)
    graphdef, params = nnx.split(qwen2_5_vl.Qwen2_5_VLForConditionalGeneration(cfg, rngs=nnx.Rngs(1)))

    def loss(params, labelled):
        model = nnx.merge(graphdef, params)
        hidden = model.hidden_states(
            batch["input_ids"],
            pixel_values=batch["pixel_values"],
            position_ids=batch["position_ids"],
            segment_ids=batch["segment_ids"],
            vision_index=batch["vision_index"],
            image_feature_index=batch["image_feature_index"],
        )
        targets, valid = shifted_targets(batch["labels"], batch["segment_ids"])
        head = model.lm_head_kernel()
        nll = per_token_nll(hidden, head, targets, chunk, valid if labelled else None, groups)
        return token_mean_loss(nll, valid), jnp.where(valid, nll, 0.0)

    grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (every_loss, every_nll), every_grads = grad(params, False)
    (only_loss, only_nll), only_grads = grad(params, True)
    valid = np.asarray(shifted_targets(batch["labels"], batch["segment_ids"])[1])
    assert 0 < valid.sum(axis=1).max() < valid.shape[1] // 2  # most positions carry no label
    np.testing.assert_allclose(only_nll, every_nll, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(only_loss, every_loss, rtol=1e-6)
    flat_every, flat_only = (jax.tree.leaves(nnx.to_pure_dict(g)) for g in (every_grads, only_grads))
    assert len(flat_every) == len(flat_only) > 20
    for a, b in zip(flat_every, flat_only, strict=True):
        scale = float(np.abs(a).max()) or 1.0
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize(
    ("chunk", "groups", "labelled", "tile"), [(3, 1, True, 8), (4, 2, True, 37), (5, 1, False, 16)]
)
def test_chunked_loss_gradients_equal_autodiff_of_the_full_logits(chunk, groups, labelled, tile):
    """`per_token_nll`'s own backward pass (logits recomputed per chunk and vocabulary tile, the
    last tile overlapping the one before; d nll / d logits = softmax − onehot) gives the gradients
    that autodiff of plain cross-entropy on the whole `[B, T, V]` logits gives, for the hidden states
    and the head, under any cotangent."""
    b, t, d, v = 4, 10, 8, 37
    keys = jax.random.split(jax.random.key(0), 5)
    hidden = jax.random.normal(keys[0], (b, t, d))
    head = jax.random.normal(keys[1], (d, v))
    targets = jax.random.randint(keys[2], (b, t), 0, v)
    valid = jax.random.bernoulli(keys[3], 0.4, (b, t)) if labelled else None
    weights = jax.random.normal(keys[4], (b, t))  # a cotangent that is not the token mean's

    def chunked(hidden, head):
        nll = per_token_nll(hidden, head, targets, chunk, valid, groups, tile)
        return (nll * weights).sum(), nll

    def reference(hidden, head):
        logp = jax.nn.log_softmax(hidden @ head, axis=-1)
        nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        nll = nll if valid is None else jnp.where(valid, nll, 0.0)
        return (nll * weights).sum(), nll

    (_, got_nll), got = jax.jit(jax.value_and_grad(chunked, (0, 1), has_aux=True))(hidden, head)
    (_, want_nll), want = jax.jit(jax.value_and_grad(reference, (0, 1), has_aux=True))(hidden, head)
    np.testing.assert_allclose(got_nll, want_nll, rtol=1e-5, atol=1e-5)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)

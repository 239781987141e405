"""Layers under scan: the scanned Qwen2.5-VL / CLIP equal the unrolled ones (logits, gradients), every
remat policy gives the gradients of none, checkpoints keep per-layer names, and the scanned step's
program does not grow with depth (so neither does its compile time).

CI time: nearly all of it XLA compiling what each test compares (the tiny Qwen2.5-VL's gradient
unrolled and scanned, under four remat policies, at 2 and 8 layers): those are the programs under
test, so no test can borrow another's. They are compiled with LLVM's optimisations off, as the whole suite's
CPU programs are (conftest.py): what is compared does not depend on them."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pathor1_jax.models import clip, qwen2_5_vl
from pathor1_jax.models.scan import REMAT_POLICIES, layer_paths

B, T, GRID = 2, 16, (1, 4, 4)  # each row: one 56 px image = 16 patches = 4 image tokens


def qwen(scan: bool, remat: str = "none", layers: int | None = None):
    cfg = qwen2_5_vl.tiny_config(vocab_size=2048)
    cfg = dataclasses.replace(cfg, image_token_id=2000, vision_start_token_id=2002, vision_end_token_id=2003)
    if layers is not None:
        cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_hidden_layers=layers))
    return qwen2_5_vl.Qwen2_5_VLForConditionalGeneration(cfg, rngs=nnx.Rngs(0), scan_layers=scan, remat=remat)


def flat(tree) -> dict[tuple, np.ndarray]:
    return {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(tree)}


def unstack(scanned: dict[tuple, np.ndarray], stacks: dict[tuple, int]) -> dict[tuple, np.ndarray]:
    """A scanned model's flat params / grads under the unrolled model's per-layer paths."""
    out = {}
    for path, value in scanned.items():
        per_layer = layer_paths(path, stacks)
        out.update({path: value} if per_layer is None else dict(zip(per_layer, value, strict=True)))
    return out


def batch(cfg):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 1000, size=(B, T))
    ids[:, 1], ids[:, 2:6], ids[:, 6] = cfg.vision_start_token_id, cfg.image_token_id, cfg.vision_end_token_id
    mask = np.ones((B, T), np.int32)
    mask[1, 12:] = 0
    pixels = rng.standard_normal((B * 16, cfg.vision.patch_dim)).astype(np.float32)
    types = (ids == cfg.image_token_id).astype(np.int32)
    prep = qwen2_5_vl.prepare_inputs(cfg, ids, mask, np.array([GRID] * B), types, B * 16)
    return ids, mask, pixels, prep["position_ids"], prep["vision_index"]


def split_params(models: dict) -> tuple[dict, dict]:
    """Graphdefs and `nnx.Param` states of named models."""
    split = {name: nnx.split(m, nnx.Param) for name, m in models.items()}
    return {n: s[0] for n, s in split.items()}, {n: s[1] for n, s in split.items()}


def assert_grads_close(grads, ref_grads, stacks, name: str):
    """Every gradient within 1e-5 of the reference's largest magnitude (summation order differs)."""
    grads = unstack(flat(grads), stacks)
    for key, g in flat(ref_grads).items():
        err = np.max(np.abs(grads[key] - g)) / max(np.max(np.abs(g)), 1e-30)
        assert err <= 1e-5, (name, key, err)


def test_scanned_qwen_equals_unrolled():
    """Same seed → the stacked parameters are the unrolled layers'; logits and every gradient
    (decoder layers, vision blocks with their full-attention flag) agree."""
    models = {"unrolled": qwen(scan=False), "scanned": qwen(scan=True)}
    stacks = models["scanned"].layer_stacks()
    assert set(stacks) == {("model", "language_model", "layers"), ("model", "visual", "blocks")}
    ref = flat(nnx.state(models["unrolled"], nnx.Param))
    got = unstack(flat(nnx.state(models["scanned"], nnx.Param)), stacks)
    assert got.keys() == ref.keys()
    assert all(np.array_equal(got[k], ref[k]) for k in ref)  # stacking keeps the unrolled init
    ids, mask, pixels, pos, vidx = batch(models["unrolled"].config)
    graphdefs, params = split_params(models)

    def loss(name, p):
        model = nnx.merge(graphdefs[name], p)
        logits = model(ids, pixel_values=pixels, position_ids=pos, segment_ids=mask, vision_index=vidx)
        return jnp.mean(jnp.where(mask[..., None] == 1, jnp.tanh(logits), 0.0)), logits

    grad = jax.value_and_grad(loss, argnums=1, has_aux=True)
    results = jax.jit(lambda ps: {name: grad(name, p) for name, p in ps.items()})(params)
    (ref_loss, ref_logits), ref_grads = results["unrolled"]
    (value, logits), grads = results["scanned"]
    np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=1e-5)
    np.testing.assert_allclose(value, ref_loss, rtol=1e-6)
    assert_grads_close(grads, ref_grads, stacks, "scanned")


def test_remat_policies_give_the_gradients_of_none():
    """Each policy really rematerialises (its checkpoint is in the program) and changes nothing."""
    models = {policy: qwen(scan=True, remat=policy) for policy in REMAT_POLICIES}
    graphdefs, params = split_params(models)
    ids, mask, _, pos, _ = batch(models["none"].config)
    text_ids = np.where(ids >= 2000, 7, ids)  # the text decoder alone

    def loss(name, p):
        hidden = nnx.merge(graphdefs[name], p).hidden_states(text_ids, position_ids=pos, segment_ids=mask)
        return jnp.mean(jnp.tanh(hidden) ** 2)

    for name, policy in REMAT_POLICIES.items():
        jaxpr = str(jax.make_jaxpr(jax.grad(lambda p, name=name: loss(name, p)))(params[name]))
        assert ("remat" in jaxpr) == (policy is not None), name
        assert policy is None or "policy=" + re.sub("0x[0-9a-f]+", "0xXXXXXXXXXXXX", repr(policy)) in jaxpr
    grad = jax.value_and_grad(loss, argnums=1)
    results = jax.jit(lambda ps: {name: grad(name, p) for name, p in ps.items()})(params)
    for name, (value, grads) in results.items():
        np.testing.assert_allclose(value, results["none"][0], rtol=1e-6, err_msg=name)
        assert_grads_close(grads, results["none"][1], {}, name)


def test_checkpoints_keep_per_layer_names(tmp_path):
    """A scanned model saves HF's per-layer tensors; the unrolled model loads them, and back."""
    scanned = qwen(scan=True)
    qwen2_5_vl.save_pretrained(scanned, tmp_path / "ckpt")
    from safetensors import safe_open

    with safe_open(tmp_path / "ckpt" / "model.safetensors", "np") as f:
        names = set(f.keys())
    assert "model.language_model.layers.1.mlp.up_proj.weight" in names
    assert "model.visual.blocks.1.attn.qkv.weight" in names
    assert not any(".layers.mlp." in n or ".blocks.attn." in n for n in names)
    unrolled = qwen2_5_vl.load_pretrained(tmp_path / "ckpt", scan_layers=False)
    reloaded = qwen2_5_vl.load_pretrained(tmp_path / "ckpt")
    want = unstack(flat(nnx.state(scanned, nnx.Param)), scanned.layer_stacks())
    for model in (unrolled, reloaded):
        got = flat(nnx.state(model, nnx.Param))
        got = unstack(got, model.layer_stacks())
        assert got.keys() == want.keys()
        assert all(np.array_equal(got[k], want[k]) for k in want)


def test_scanned_clip_equals_unrolled():
    cfg = clip.tiny_config()
    scanned = clip.CLIPModel(cfg, rngs=nnx.Rngs(0))
    unrolled = clip.CLIPModel(cfg, rngs=nnx.Rngs(0), scan_layers=False)
    got = unstack(flat(nnx.state(scanned, nnx.Param)), scanned.layer_stacks())
    assert all(np.array_equal(v, got[k]) for k, v in flat(nnx.state(unrolled, nnx.Param)).items())
    images = np.random.default_rng(0).standard_normal((2, cfg.vision.image_size, cfg.vision.image_size, 3))
    ids = np.array([[5, 6, 7, cfg.text.vocab_size - 1, 0], [8, 9, cfg.text.vocab_size - 1, 0, 0]])
    graphdefs, states = split_params({"scanned": scanned, "unrolled": unrolled})

    def encode(states):
        models = {name: nnx.merge(graphdefs[name], state) for name, state in states.items()}
        return {name: (m.encode_image(images), m.encode_text(ids)) for name, m in models.items()}

    out = jax.jit(encode)(states)  # both towers of both models: one compile
    for got, want in zip(out["scanned"], out["unrolled"], strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_bad_remat_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="remat policy 'some' is not one of"):
        qwen(scan=True, remat="some")


def _program_sizes(scan: bool, layers: int, compile_: bool) -> tuple[int, int | None]:
    """Ops of the lowered (StableHLO) and compiled (HLO) gradient of the text decoder."""
    model = nnx.eval_shape(lambda: qwen(scan, layers=layers))
    graphdef, params = nnx.split(model, nnx.Param)
    ids = jax.ShapeDtypeStruct((B, 64), jnp.int32)
    pos = jax.ShapeDtypeStruct((3, B, 64), jnp.int32)

    def loss(p, ids, pos):
        hidden = nnx.merge(graphdef, p).hidden_states(ids, position_ids=pos, segment_ids=jnp.ones_like(ids))
        return jnp.sum(hidden**2)

    lowered = jax.jit(jax.grad(loss)).lower(params, ids, pos)
    count = lambda text: sum(1 for line in text.splitlines() if " = " in line)  # noqa: E731
    return count(lowered.as_text()), count(lowered.compile().as_text()) if compile_ else None


def test_scanned_program_does_not_grow_with_depth():
    """2 vs 8 decoder layers: scanned, the traced program is the same size (one layer body) and so,
    within XLA's fusion noise, is the compiled one; unrolled, it grows with every layer. (Compile
    time follows program size; wall-clock numbers: bench/scan_compile.py.)"""
    lowered_2, compiled_2 = _program_sizes(True, 2, True)
    lowered_8, compiled_8 = _program_sizes(True, 8, True)
    assert lowered_8 == lowered_2
    assert abs(compiled_8 - compiled_2) <= 0.01 * compiled_2, (compiled_2, compiled_8)
    unrolled_2, _ = _program_sizes(False, 2, False)
    unrolled_8, _ = _program_sizes(False, 8, False)
    assert unrolled_8 > 2.5 * unrolled_2, (unrolled_2, unrolled_8)

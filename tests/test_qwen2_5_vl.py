"""Qwen2.5-VL parity with Hugging Face `Qwen2_5_VLForConditionalGeneration` (float32, random tiny configs)."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from qwen_reference import hf_logits, image_prompt, random_hf_model, random_pixels

from pathor1_jax.kernels.blocked_attention import block_ranges
from pathor1_jax.models import qwen2_5_vl
from pathor1_jax.models.qwen2_5_vl.modeling import segment_runs

TOL = 1e-4
GRID_A = (1, 8, 8)  # 112 px: 16 tokens, split into 2×2 windows of 56 px
GRID_B = (1, 4, 6)  # 56×84 px: 6 tokens


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An HF checkpoint with an untied head and the real vocabulary, and both models loaded from it."""
    config = qwen2_5_vl.tiny_config()
    config = qwen2_5_vl.Qwen2_5_VLConfig(text=config.text, vision=config.vision, tie_word_embeddings=False)
    hf = random_hf_model(config)
    path = tmp_path_factory.mktemp("qwen") / "tiny"
    hf.save_pretrained(path)
    return path, hf, qwen2_5_vl.load_pretrained(path)


def _mm_types(ids: np.ndarray) -> np.ndarray:
    return (ids == 151655).astype(np.int64)


def _assert_close(ours, ref, mask=None):
    ours = np.asarray(ours)
    if mask is not None:
        ours, ref = ours[mask.astype(bool)], ref[mask.astype(bool)]
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)


def test_text_only(checkpoint):
    _, hf, model = checkpoint
    ids = np.array([[9707, 11, 1879, 0, 374, 264, 1273, 13]])
    _assert_close(model(ids), hf_logits(hf, input_ids=ids))


def test_one_image_with_windows(checkpoint):
    _, hf, model = checkpoint
    assert model.config.vision.window_size // 28 < GRID_A[1] // 2  # windows really split the image
    ids = np.array([image_prompt([GRID_A], [3838, 374, 419, 30])])
    inputs = dict(input_ids=ids, pixel_values=random_pixels([GRID_A]), image_grid_thw=np.array([GRID_A]))
    mm = _mm_types(ids)
    _assert_close(model(**inputs, mm_token_type_ids=mm), hf_logits(hf, **inputs, mm_token_type_ids=mm))
    # Without mm_token_type_ids HF falls back to 1D positions; so do we.
    _assert_close(model(**inputs), hf_logits(hf, **inputs))


def test_two_images_of_different_grids(checkpoint):
    _, hf, model = checkpoint
    ids = np.array([image_prompt([GRID_A, GRID_B], [3838, 374, 1493, 30])])
    inputs = dict(
        input_ids=ids,
        pixel_values=random_pixels([GRID_A, GRID_B], seed=1),
        image_grid_thw=np.array([GRID_A, GRID_B]),
        mm_token_type_ids=_mm_types(ids),
    )
    _assert_close(model(**inputs), hf_logits(hf, **inputs))


def test_left_padded_batch_of_two(checkpoint):
    _, hf, model = checkpoint
    long = image_prompt([GRID_A], [3838, 374, 419, 30, 1234, 99])
    short = image_prompt([GRID_B], [3838, 374])
    pad = len(long) - len(short)
    ids = np.array([long, [0] * pad + short])
    mask = np.array([[1] * len(long), [0] * pad + [1] * len(short)])
    pixels = np.concatenate([random_pixels([GRID_A], seed=2), random_pixels([GRID_B], seed=3)])
    inputs = dict(
        input_ids=ids,
        attention_mask=mask,
        pixel_values=pixels,
        image_grid_thw=np.array([GRID_A, GRID_B]),
        mm_token_type_ids=_mm_types(ids),
    )
    _assert_close(model(**inputs), hf_logits(hf, **inputs), mask)


def test_vision_tower_equals_hf(checkpoint):
    _, hf, model = checkpoint
    grids = np.array([GRID_A, GRID_B])
    pixels = random_pixels([GRID_A, GRID_B], seed=4)
    index = qwen2_5_vl.vision_index(grids, model.config.vision)
    ours = model.model.visual(jnp.asarray(pixels), index)
    with torch.no_grad():
        ref = hf.model.visual(torch.as_tensor(pixels), grid_thw=torch.as_tensor(grids)).pooler_output.numpy()
    np.testing.assert_allclose(np.asarray(ours), ref, atol=TOL, rtol=0)


def test_vision_tower_equals_hf_on_many_images_of_different_sizes(checkpoint):
    """Five images (432 patches, padded to 512) in one sequence: the block-sparse attention visits a
    few 64-patch blocks per query block, never all of them, and still equals HF on every image."""
    _, hf, model = checkpoint
    grids = np.array([GRID_A, GRID_B, (1, 12, 16), (1, 6, 4), (1, 16, 8)])
    pixels = random_pixels(list(map(tuple, grids)), seed=7)
    real = pixels.shape[0]
    index = qwen2_5_vl.vision_index(grids, model.config.vision, num_patches=512)
    padded = np.concatenate([pixels, np.zeros((512 - real, pixels.shape[1]), pixels.dtype)])
    ours = np.asarray(model.model.visual(jnp.asarray(padded), index))[: real // 4]
    with torch.no_grad():
        ref = hf.model.visual(torch.as_tensor(pixels), grid_thw=torch.as_tensor(grids)).pooler_output.numpy()
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)
    for ids in (index.window_segment_ids, index.frame_segment_ids):
        runs = segment_runs(jnp.asarray(ids))[None]
        lo, hi = block_ranges(runs, runs, 64, 64)
        assert int((hi - lo).max()) < 512 // 64


def _vision_temporaries(model, images: int) -> int:
    """Compiled (CPU) temporaries of the vision tower's gradient w.r.t. its pixels, for `images`
    images of 32×32 patches (448 px; 16 windows of 64 patches each) in one sequence."""
    grids = np.array([(1, 32, 32)] * images)
    index = qwen2_5_vl.vision_index(grids, model.config)
    graphdef, state = nnx.split(model)

    def loss(pixels, state, index):
        return nnx.merge(graphdef, state)(pixels, index).sum()

    pixels = jax.ShapeDtypeStruct((images * 1024, model.config.patch_dim), jnp.float32)
    args = (pixels, *jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (state, index)))
    return jax.jit(jax.grad(loss)).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_vision_tower_temporaries_grow_linearly_with_patches():
    """4× the images (2,048 → 8,192 patches): the temporaries grow ~4×; one segment-masked attention
    over all patches would grow 16× (to 512 MiB of float32 logits here). Two CPU compiles of the
    tower's gradient: ~15 s, over 30 s on a loaded machine."""
    config = dataclasses.replace(qwen2_5_vl.tiny_config().vision, window_size=112)
    model = qwen2_5_vl.modeling.VisionTransformer(
        config,
        rngs=nnx.Rngs(0),
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        attention_impl="xla",
        scan_layers=True,
        remat="none",
    )
    small, large = _vision_temporaries(model, 2), _vision_temporaries(model, 8)
    assert large / small < 5, (small, large)
    assert large < 2 * 8192**2 * 4 / 8  # far below one [H, N, N] float32 logits tensor


def test_rope_index_equals_hf(checkpoint):
    _, hf, model = checkpoint
    long = image_prompt([GRID_A, GRID_B], [5, 6, 7])
    short = image_prompt([GRID_B], [8])
    pad = len(long) - len(short)
    ids = np.array([long, [0] * pad + short])
    mask = np.array([[1] * len(long), [0] * pad + [1] * len(short)])
    grids = np.array([GRID_A, GRID_B, GRID_B])
    ours, deltas = qwen2_5_vl.get_rope_index(ids, grids, mask, _mm_types(ids), model.config)
    ref, ref_deltas = hf.model.get_rope_index(
        torch.as_tensor(ids),
        mm_token_type_ids=torch.as_tensor(_mm_types(ids)),
        image_grid_thw=torch.as_tensor(grids),
        attention_mask=torch.as_tensor(mask),
    )
    np.testing.assert_array_equal(ours, ref.numpy())
    np.testing.assert_array_equal(deltas, ref_deltas.numpy())


def test_tied_embeddings(tmp_path):
    config = qwen2_5_vl.tiny_config(num_hidden_layers=1)
    hf = random_hf_model(config, seed=5)
    hf.save_pretrained(tmp_path)
    model = qwen2_5_vl.load_pretrained(tmp_path)
    assert model.lm_head is None
    ids = np.array([[1, 2, 3, 4]])
    _assert_close(model(ids), hf_logits(hf, input_ids=ids))


def test_save_pretrained_round_trip(checkpoint, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration as HFModel

    _, _, model = checkpoint
    qwen2_5_vl.save_pretrained(model, tmp_path / "ours")
    hf = HFModel.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    ids = np.array([image_prompt([GRID_B], [3838, 374])])
    inputs = dict(
        input_ids=ids, pixel_values=random_pixels([GRID_B], seed=6), image_grid_thw=np.array([GRID_B])
    )
    inputs["mm_token_type_ids"] = _mm_types(ids)
    _assert_close(model(**inputs), hf_logits(hf, **inputs))
    assert not [p for p in (tmp_path).iterdir() if p.name.startswith(".")]  # no temp dir left behind


def test_greedy_generation_equals_hf(checkpoint):
    _, hf, model = checkpoint
    long = image_prompt([GRID_A], [3838, 374, 419, 30])
    short = image_prompt([GRID_B], [3838])
    pad = len(long) - len(short)
    ids = np.array([long, [151643] * pad + short])
    mask = np.array([[1] * len(long), [0] * pad + [1] * len(short)])
    pixels = np.concatenate([random_pixels([GRID_A], seed=7), random_pixels([GRID_B], seed=8)])
    grids = np.array([GRID_A, GRID_B])
    ours = qwen2_5_vl.generate(model, ids, mask, pixels, grids, max_new_tokens=16, eos_token_id=-1)
    with torch.no_grad():
        ref = hf.generate(
            input_ids=torch.as_tensor(ids),
            attention_mask=torch.as_tensor(mask),
            pixel_values=torch.as_tensor(pixels),
            image_grid_thw=torch.as_tensor(grids),
            mm_token_type_ids=torch.as_tensor(_mm_types(ids)),
            max_new_tokens=16,
            min_new_tokens=16,
            do_sample=False,
        )[:, ids.shape[1] :].numpy()
    np.testing.assert_array_equal(np.asarray(ours), ref)


def test_image_token_count_mismatch_is_a_clear_error(checkpoint):
    _, _, model = checkpoint
    full = image_prompt([GRID_A], [1, 2])
    ids = np.array([full[:1] + full[2:]])  # one image-pad token short
    with pytest.raises(ValueError, match=r"image-pad tokens .* needs prod\(grid_thw\)/merge² = 16"):
        model(ids, pixel_values=random_pixels([GRID_A]), image_grid_thw=np.array([GRID_A]))


def test_missing_weights_file(tmp_path, checkpoint):
    path, _, _ = checkpoint
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"no \*.safetensors or \*.safetensors.index.json file"):
        qwen2_5_vl.load_pretrained(tmp_path)


def test_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="unknown model_type 'llama'"):
        qwen2_5_vl.load_pretrained(tmp_path)


def test_shape_mismatch_names_the_tensor(tmp_path, checkpoint):
    path, _, _ = checkpoint
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").symlink_to(path / "model.safetensors")
    with pytest.raises(
        ValueError,
        match=r"tensor 'model.language_model.layers.0.mlp.(gate|up|down)_proj.weight' has shape \(128, 64\)",
    ):
        qwen2_5_vl.load_pretrained(tmp_path)


def test_hub_layout_with_sharded_index(tmp_path, checkpoint):
    """The original hub files: flat text config with `rope_scaling`, `visual.*` / `model.layers.*`
    tensor names, weights split over two files behind `model.safetensors.index.json`."""
    from safetensors.numpy import load_file, save_file

    path, _, model = checkpoint
    nested = json.loads((path / "config.json").read_text())
    text = nested.pop("text_config")
    rope = text.pop("rope_parameters")
    flat = {**text, **nested, "model_type": "qwen2_5_vl", "rope_theta": rope["rope_theta"]}
    flat["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    (tmp_path / "config.json").write_text(json.dumps(flat))
    tensors = {
        name.replace("model.visual.", "visual.").replace("model.language_model.", "model."): value
        for name, value in load_file(path / "model.safetensors").items()
    }
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fname, members in shards.items():
        save_file({n: tensors[n] for n in members}, tmp_path / fname)
    weight_map = {n: fname for fname, members in shards.items() for n in members}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    loaded = qwen2_5_vl.load_pretrained(tmp_path)
    assert loaded.config == model.config
    ids = np.array([[1, 2, 3, 4, 5]])
    np.testing.assert_array_equal(np.asarray(loaded(ids)), np.asarray(model(ids)))


def test_vision_index_skips_padding_grid_rows(checkpoint):
    _, _, model = checkpoint
    grids = np.array([GRID_A, GRID_B])
    exact = qwen2_5_vl.vision_index(grids, model.config.vision, num_patches=120)
    padded = qwen2_5_vl.vision_index(
        np.array([GRID_A, GRID_B, (0, 0, 0)]), model.config.vision, num_patches=120
    )
    for a, b in zip(jax.tree.leaves(exact), jax.tree.leaves(padded), strict=True):
        np.testing.assert_array_equal(a, b)
    assert (exact.window_segment_ids[88:] == 0).all() and exact.window_segment_ids[:88].min() == 1

"""CLIP parity with Hugging Face `CLIPModel` (float32, random tiny config saved by the test), and
the open_clip key layout (open_clip itself cannot be imported here: it needs torchvision)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from transformers import CLIPConfig as HFConfig
from transformers import CLIPModel as HFModel

from pathor1_jax.models import clip

TOL = 1e-5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = clip.tiny_config()
    torch.manual_seed(0)
    hf = HFModel(HFConfig(**config.to_hf_dict())).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    path = tmp_path_factory.mktemp("clip") / "tiny"
    hf.save_pretrained(path)
    return path, hf, clip.load_pretrained(path)


def _inputs(config):
    rng = np.random.default_rng(0)
    pixels = rng.normal(size=(3, config.vision.image_size, config.vision.image_size, 3)).astype(np.float32)
    ids = np.zeros((3, 12), dtype=np.int64)
    for row, length in enumerate((5, 9, 12)):
        ids[row, 0] = 49406
        ids[row, 1 : length - 1] = rng.integers(300, 49000, length - 2)
        ids[row, length - 1] = 49407
    return pixels, ids


def _hf_features(hf, pixels, ids):
    def tensor(x):
        return x if isinstance(x, torch.Tensor) else x.pooler_output

    with torch.no_grad():
        image = tensor(hf.get_image_features(pixel_values=torch.as_tensor(pixels).permute(0, 3, 1, 2)))
        text = tensor(hf.get_text_features(input_ids=torch.as_tensor(ids)))
    return image.numpy(), text.numpy()


def test_features_equal_hf(checkpoint):
    _, hf, model = checkpoint
    pixels, ids = _inputs(model.config)
    ref_image, ref_text = _hf_features(hf, pixels, ids)
    np.testing.assert_allclose(np.asarray(model.encode_image(pixels)), ref_image, atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(model.encode_text(ids)), ref_text, atol=TOL, rtol=0)
    np.testing.assert_allclose(float(model.logit_scale[...]), hf.logit_scale.item(), atol=TOL)


def _hf_to_open_clip(hf_state: dict[str, np.ndarray], layers: int) -> dict[str, np.ndarray]:
    """open_clip's layout of the same weights (written independently of our loader)."""
    oc = {
        "visual.conv1.weight": hf_state["vision_model.embeddings.patch_embedding.weight"],
        "visual.class_embedding": hf_state["vision_model.embeddings.class_embedding"],
        "visual.positional_embedding": hf_state["vision_model.embeddings.position_embedding.weight"],
        "visual.proj": hf_state["visual_projection.weight"].T,
        "token_embedding.weight": hf_state["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": hf_state["text_model.embeddings.position_embedding.weight"],
        "text_projection": hf_state["text_projection.weight"].T,
        "logit_scale": hf_state["logit_scale"],
    }
    for ours, theirs in (
        ("vision_model.pre_layrnorm", "visual.ln_pre"),
        ("vision_model.post_layernorm", "visual.ln_post"),
        ("text_model.final_layer_norm", "ln_final"),
    ):
        for leaf in ("weight", "bias"):
            oc[f"{theirs}.{leaf}"] = hf_state[f"{ours}.{leaf}"]
    for tower, prefix in (("vision_model", "visual.transformer"), ("text_model", "transformer")):
        for i in range(layers):
            src, dst = f"{tower}.encoder.layers.{i}", f"{prefix}.resblocks.{i}"
            for leaf in ("weight", "bias"):
                oc[f"{dst}.attn.in_proj_{leaf}"] = np.concatenate(
                    [hf_state[f"{src}.self_attn.{p}.{leaf}"] for p in ("q_proj", "k_proj", "v_proj")]
                )
                oc[f"{dst}.attn.out_proj.{leaf}"] = hf_state[f"{src}.self_attn.out_proj.{leaf}"]
                oc[f"{dst}.ln_1.{leaf}"] = hf_state[f"{src}.layer_norm1.{leaf}"]
                oc[f"{dst}.ln_2.{leaf}"] = hf_state[f"{src}.layer_norm2.{leaf}"]
                oc[f"{dst}.mlp.c_fc.{leaf}"] = hf_state[f"{src}.mlp.fc1.{leaf}"]
                oc[f"{dst}.mlp.c_proj.{leaf}"] = hf_state[f"{src}.mlp.fc2.{leaf}"]
    return {k: np.array(v, order="C") for k, v in oc.items()}


def test_open_clip_state_dict_gives_the_same_features(checkpoint, tmp_path):
    _, hf, model = checkpoint
    hf_state = {k: v.detach().numpy() for k, v in hf.state_dict().items() if "position_ids" not in k}
    open_clip_state = _hf_to_open_clip(hf_state, model.config.vision.num_hidden_layers)
    save_file(open_clip_state, tmp_path / "open_clip.safetensors")
    torch.save({k: torch.from_numpy(v) for k, v in open_clip_state.items()}, tmp_path / "open_clip.pt")
    pixels, ids = _inputs(model.config)
    ref_image, ref_text = _hf_features(hf, pixels, ids)
    for file in ("open_clip.safetensors", "open_clip.pt"):
        loaded = clip.load_open_clip(tmp_path / file, model.config)
        np.testing.assert_allclose(np.asarray(loaded.encode_image(pixels)), ref_image, atol=TOL, rtol=0)
        # open_clip pools at the largest id: EOT (49407) is the largest id in these rows.
        np.testing.assert_allclose(np.asarray(loaded.encode_text(ids)), ref_text, atol=TOL, rtol=0)


def test_bad_checkpoints_are_clear_errors(checkpoint, tmp_path):
    path, _, _ = checkpoint
    with pytest.raises(ValueError, match="no config.json"):
        clip.load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "siglip"}))
    with pytest.raises(ValueError, match="unknown model_type 'siglip'"):
        clip.load_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unknown open_clip model 'RN50'"):
        clip.load_open_clip(path / "model.safetensors", "RN50")
    with pytest.raises(ValueError, match="unexpected tensor 'visual.attnpool.c_proj.weight'"):
        clip.open_clip_to_hf({"visual.attnpool.c_proj.weight": np.zeros(1)})

"""Across processes each one feeds its own rows and image patches: `offset_to_block` renumbers a
process's batch as its block of the global batch. Simulated here with two "processes" on one host:
the global forward equals each block's own forward."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from pathor1_jax.data.demo import demo_records
from pathor1_jax.data.packing import pack_examples
from pathor1_jax.data.pipeline import ProcessorSpec, default_tokenizer_path, get_processor
from pathor1_jax.models import qwen2_5_vl
from pathor1_jax.train.lm import offset_to_block, prepare_batch


def test_blocks_of_two_processes_give_each_process_its_own_features():
    cfg = qwen2_5_vl.tiny_config()
    spec = ProcessorSpec(default_tokenizer_path(), min_pixels=56 * 56, max_pixels=56 * 56, rope_config=cfg)
    processor = get_processor(spec)
    records = demo_records("chat")
    kw = dict(batch_size=2, max_len=256, pad_token_id=processor.pad_token_id, max_patches=64, max_images=4)
    local = []
    for part in (records[:2], records[5:8]):  # the two processes hold different numbers of images
        (batch,) = pack_examples([processor.encode(r) for r in part], packing=True, **kw)
        local.append(prepare_batch(batch, cfg))
    model = qwen2_5_vl.Qwen2_5_VLForConditionalGeneration(cfg, rngs=nnx.Rngs(0))

    def hidden(b):
        return np.asarray(
            model.hidden_states(
                b["input_ids"],
                pixel_values=b["pixel_values"],
                position_ids=b["position_ids"],
                segment_ids=b["segment_ids"],
                vision_index=b["vision_index"],
                image_feature_index=b["image_feature_index"],
            )
        )

    blocks = [offset_to_block(b, i, cfg.vision.spatial_merge_size**2) for i, b in enumerate(local)]

    def concat(key):  # rows are axis 0 (position_ids: 1); patches are axis 0 of their fields
        axis = 1 if key == "position_ids" else 0
        return jax.tree.map(lambda *xs: np.concatenate(xs, axis=axis), *[b[key] for b in blocks])

    merged = {k: concat(k) for k in blocks[0]}
    np.testing.assert_allclose(hidden(merged), np.concatenate([hidden(b) for b in local]), atol=1e-5)
    # without the renumbering the second block would take the first block's image features
    unshifted = {**merged, "image_feature_index": np.concatenate([b["image_feature_index"] for b in local])}
    assert not np.allclose(hidden(unshifted), hidden(merged), atol=1e-3)

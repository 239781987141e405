"""Qwen2.5-VL processing (template, labels, image tokens, M-RoPE), packing, overflow policies and the
grain pipeline (shuffling, sharding, bad images, checkpointable iterators)."""

import io
import json
import logging

import numpy as np
import pytest
from PIL import Image

from pathor1_jax.data.chat_template import render_messages, render_with_spans
from pathor1_jax.data.demo import demo_records
from pathor1_jax.data.images import ImageDecodeError
from pathor1_jax.data.packing import BatchPacker, fit_to_length, pack_examples, real_grids
from pathor1_jax.data.pipeline import (
    ProcessorSpec,
    default_tokenizer_path,
    get_processor,
    make_batch_iterator,
    record_dataset,
)
from pathor1_jax.data.processing import IGNORE_INDEX, ImageCountError
from pathor1_jax.data.records import CaptionRecord, ImageRef, parse_record

TILE_PIXELS = 56 * 56  # every image becomes a 4×4 patch grid = 2×2 = 4 image tokens
IMAGE_ID = 151655


@pytest.fixture(scope="module")
def spec():
    return ProcessorSpec(default_tokenizer_path(), min_pixels=TILE_PIXELS, max_pixels=TILE_PIXELS)


@pytest.fixture(scope="module")
def proc(spec):
    return get_processor(spec)


@pytest.fixture(scope="module")
def hf_tokenizer(spec):
    """transformers' tokenizer on the same files: the reference."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec.tokenizer_path)


def _png(color=(180, 40, 120)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (56, 56), color).save(buffer, format="PNG")
    return buffer.getvalue()


def _chat(rid="c1", images=1, placeholders=1, text="What stain?"):
    user = [{"type": "image"}] * placeholders + [{"type": "text", "text": text}]
    return parse_record(
        "chat",
        {
            "id": rid,
            "messages": [
                {"role": "system", "content": "You are a pathologist."},
                {"role": "user", "content": user},
                {"role": "assistant", "content": "<think>pink</think><answer>H&E</answer>"},
                {"role": "user", "content": "And the tissue?"},
                {"role": "assistant", "content": "<answer>skin</answer>"},
            ],
            "images": [{"bytes_b64": __import__("base64").b64encode(_png()).decode()}] * images,
        },
        "test",
    )


EXPECTED_TEXT = (
    "<|im_start|>system\nYou are a pathologist.<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What stain?<|im_end|>\n"
    "<|im_start|>assistant\n<think>pink</think><answer>H&E</answer><|im_end|>\n"
    "<|im_start|>user\nAnd the tissue?<|im_end|>\n"
    "<|im_start|>assistant\n<answer>skin</answer><|im_end|>\n"
)


def test_template_renders_the_official_format():
    text, spans = render_with_spans(_chat())
    assert text == EXPECTED_TEXT
    assert [text[a:b] for a, b in spans] == [
        "<think>pink</think><answer>H&E</answer><|im_end|>",
        "<answer>skin</answer><|im_end|>",
    ]
    default_system = render_messages([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert default_system == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_labels_cover_only_assistant_turns(proc, hf_tokenizer):
    ex = proc.encode(_chat())
    tok = hf_tokenizer
    ids, labels = ex["input_ids"], ex["labels"]
    expanded = EXPECTED_TEXT.replace("<|image_pad|>", "<|image_pad|>" * 4)
    assert ids.tolist() == tok(expanded, add_special_tokens=False)["input_ids"]
    trained = labels != IGNORE_INDEX
    assert (labels[trained] == ids[trained]).all()
    expected = tok("<think>pink</think><answer>H&E</answer><|im_end|>", add_special_tokens=False)["input_ids"]
    expected += tok("<answer>skin</answer><|im_end|>", add_special_tokens=False)["input_ids"]
    assert labels[trained].tolist() == expected
    assert not trained[ids == IMAGE_ID].any()
    assert (ex["mm_token_type_ids"] == (ids == IMAGE_ID)).all() and ex["mm_token_type_ids"].sum() == 4
    assert labels[0] == IGNORE_INDEX


def test_caption_labels_are_the_caption(proc):
    record = CaptionRecord(id="p", image=ImageRef(data=_png()), caption="Pink collagen and purple nuclei.")
    ex = proc.encode(record)
    trained = ex["labels"][ex["labels"] != IGNORE_INDEX]
    assert proc.tokenizer.decode(trained) == "Pink collagen and purple nuclei.<|im_end|>"


def test_image_tokens_pixels_and_mrope_positions(proc):
    ex = proc.encode(_chat())
    assert ex["pixel_values"].shape == (16, 1176) and ex["image_grid_thw"].tolist() == [[1, 4, 4]]
    pos, ids = ex["position_ids"], ex["input_ids"]
    n0 = int(np.flatnonzero(ids == IMAGE_ID)[0])
    assert (pos[:, :n0] == np.arange(n0)).all()
    assert pos[:, n0 : n0 + 4].tolist() == [[n0] * 4, [n0, n0, n0 + 1, n0 + 1], [n0, n0 + 1, n0, n0 + 1]]
    rest = ids.shape[0] - (n0 + 4)
    assert (pos[:, n0 + 4 :] == n0 + 2 + np.arange(rest)).all()


@pytest.mark.parametrize("images, placeholders", [(1, 2), (2, 1), (0, 1)])
def test_image_count_mismatch_is_a_clear_error(proc, images, placeholders):
    with pytest.raises(
        ImageCountError, match=rf"record 'bad': {images} image\(s\) but the chat has {placeholders}"
    ):
        proc.encode(_chat("bad", images=images, placeholders=placeholders))


@pytest.fixture(scope="module")
def demo_examples(proc):
    return [proc.encode(r) for r in demo_records("chat", "train")[:14]]


def _segments(batches):
    """Per-sample token streams recovered from packed batches, in order."""
    out = []
    for batch in batches:
        for r in range(batch["input_ids"].shape[0]):
            seg = batch["segment_ids"][r]
            for s in range(1, seg.max() + 1):
                m = seg == s
                out.append(
                    {
                        "input_ids": batch["input_ids"][r, m],
                        "labels": batch["labels"][r, m],
                        "position_ids": batch["position_ids"][:, r, m],
                        "mm_token_type_ids": batch["mm_token_type_ids"][r, m],
                    }
                )
    return out


def test_packed_and_unpacked_give_the_same_per_example_streams(demo_examples):
    kw = dict(batch_size=2, max_len=256, pad_token_id=151643, max_patches=128, max_images=8)
    packed = pack_examples(demo_examples, packing=True, **kw)
    unpacked = pack_examples(demo_examples, packing=False, **kw)
    assert len(packed) < len(unpacked)
    assert max(b["segment_ids"].max() for b in packed) > 1
    for batches in (packed, unpacked):
        segments = _segments(batches)
        assert len(segments) == len(demo_examples)
        for seg, ex in zip(segments, demo_examples, strict=True):
            for key in seg:
                np.testing.assert_array_equal(seg[key], ex[key], err_msg=key)
            assert seg["labels"][0] == IGNORE_INDEX  # the shifted loss never crosses segments
        examples = iter(demo_examples)
        for b in batches:
            n_img = int((b["image_grid_thw"].sum(-1) > 0).sum())
            batch_examples = [next(examples) for _ in range(int(b["segment_ids"].max(-1).sum()))]
            pixels = np.concatenate([e["pixel_values"] for e in batch_examples])
            np.testing.assert_array_equal(b["pixel_values"][: len(pixels)], pixels)
            assert not b["pixel_values"][len(pixels) :].any() and b["pixel_values"].shape == (128, 1176)
            assert b["image_grid_thw"].shape == (8, 3) and not b["image_grid_thw"][n_img:].any()
            assert int(b["mm_token_type_ids"].sum()) == 4 * n_img
            np.testing.assert_array_equal(b["loss_mask"], b["labels"] != IGNORE_INDEX)
            assert (b["input_ids"][b["segment_ids"] == 0] == 151643).all()


def test_padded_grids_work_with_the_model_vision_index(demo_examples):
    qwen = pytest.importorskip("pathor1_jax.models.qwen2_5_vl")
    (batch, *_) = pack_examples(
        demo_examples,
        packing=True,
        batch_size=2,
        max_len=256,
        pad_token_id=151643,
        max_patches=128,
        max_images=8,
    )
    cfg = qwen.tiny_config()
    index = qwen.vision_index(real_grids(batch["image_grid_thw"]), cfg.vision, num_patches=128)
    real = int(batch["image_grid_thw"].prod(-1).sum())
    assert (np.asarray(index.window_segment_ids)[real:] == 0).all()
    assert (np.asarray(index.window_segment_ids)[:real] > 0).all()


def _synthetic(n=20, image_at=(5,), n_img_tokens=4):
    ids = np.arange(100, 100 + n, dtype=np.int32)
    for start in image_at:
        ids[start : start + n_img_tokens] = IMAGE_ID
    return {
        "input_ids": ids,
        "labels": np.where(ids == IMAGE_ID, IGNORE_INDEX, ids),
        "mm_token_type_ids": (ids == IMAGE_ID).astype(np.int32),
        "position_ids": np.tile(np.arange(n, dtype=np.int32), (3, 1)),
        "pixel_values": np.arange(16 * len(image_at), dtype=np.float32)[:, None]
        * np.ones((1, 1176), np.float32),
        "image_grid_thw": np.array([[1, 4, 4]] * len(image_at), np.int32),
    }


def test_overflow_policies():
    ex = _synthetic(20, image_at=(5, 14))  # image pads at [5, 9) and [14, 18)
    assert fit_to_length(ex, 20, "drop")[0] is ex
    dropped, reason = fit_to_length(ex, 19, "drop")
    assert dropped is None and "longer than max_len=19 (20 tokens)" in reason
    cut, _ = fit_to_length(ex, 12, "truncate")  # keeps the first image, removes the second
    assert cut["input_ids"].tolist() == ex["input_ids"][:12].tolist()
    assert cut["position_ids"].shape == (3, 12) and cut["image_grid_thw"].tolist() == [[1, 4, 4]]
    np.testing.assert_array_equal(cut["pixel_values"], ex["pixel_values"][:16])
    through, reason = fit_to_length(ex, 16, "truncate")
    assert through is None and "cut through an image" in reason
    prompt_only = dict(ex, labels=np.where(np.arange(20) < 15, IGNORE_INDEX, ex["labels"]))
    nothing, reason = fit_to_length(prompt_only, 12, "truncate")
    assert nothing is None and "leaves no loss tokens" in reason
    with pytest.raises(ValueError, match="overflow policy must be one of"):
        fit_to_length(ex, 12, "wrap")


def test_packer_respects_patch_and_image_budgets():
    packer = BatchPacker(batch_size=4, max_len=64, pad_token_id=0, max_patches=32, max_images=8)
    assert packer.add(_synthetic()) and packer.add(_synthetic())
    assert not packer.add(_synthetic())  # a third image would need 48 > 32 patches
    assert "patches > max_patches=8" in BatchPacker(
        batch_size=1, max_len=64, pad_token_id=0, max_patches=8
    ).fits_alone(_synthetic())


def test_shuffling_is_seeded_and_sharding_partitions():
    source = demo_records("caption", "test")[:30]
    ids = lambda ds: [r.id for r in ds]  # noqa: E731
    one = ids(record_dataset(source, seed=1, num_epochs=2, shard=(0, 1)))
    assert one == ids(record_dataset(source, seed=1, num_epochs=2, shard=(0, 1)))
    assert one != ids(record_dataset(source, seed=2, num_epochs=2, shard=(0, 1)))
    assert sorted(one[:30]) == sorted(one[30:]) and one[:30] != one[30:]  # a new permutation per epoch
    shards = [ids(record_dataset(source, seed=1, num_epochs=1, shard=(i, 3))) for i in range(3)]
    assert sorted(sum(shards, [])) == sorted(r.id for r in source)
    assert all(len(s) == 10 for s in shards)


def _batches(it, n):
    return [next(it) for _ in range(n)]


def test_iterator_state_restores_the_exact_order(spec):
    source = demo_records("chat", "train")[:24]
    kw = dict(batch_size=2, max_len=256, seed=5, max_patches=128, max_images=8, shard=(0, 1))
    it = make_batch_iterator(source, spec, **kw)
    _batches(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    expected = _batches(it, 6)  # crosses into the second epoch
    restored = make_batch_iterator(source, spec, **kw)
    restored.set_state(state)
    for a, b in zip(expected, _batches(restored, 6), strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    fresh = _batches(make_batch_iterator(source, spec, **kw), 4)  # same seed: the same stream
    np.testing.assert_array_equal(fresh[3]["input_ids"], expected[0]["input_ids"])
    assert not np.array_equal(fresh[0]["input_ids"], expected[0]["input_ids"])


def _broken_source():
    good = demo_records("caption", "test")[:5]
    return good + [CaptionRecord(id="broken", image=ImageRef(data=b"\x89PNG garbage"), caption="x")]


def test_corrupt_image_errors_or_is_counted_and_skipped(spec, caplog):
    kw = dict(batch_size=8, max_len=512, num_epochs=1, shuffle=False, shard=(0, 1))
    with pytest.raises(ImageDecodeError, match="record 'broken'"):
        _batches(make_batch_iterator(_broken_source(), spec, **kw), 1)
    with caplog.at_level(logging.WARNING):
        (batch,) = list(make_batch_iterator(_broken_source(), spec, on_bad_image="skip", **kw))
    assert int(batch["segment_ids"].max(-1).sum()) == 5
    assert "skipped record 'broken'" in caplog.text and "(1 skipped so far)" in caplog.text


def test_long_sample_follows_the_overflow_policy(spec, caplog):
    good = sorted(demo_records("caption", "test"), key=lambda r: len(r.caption))[:3]  # fit in 96 tokens
    long = CaptionRecord(id="long", image=ImageRef(data=_png()), caption="very long caption " * 40)
    kw = dict(batch_size=4, max_len=96, num_epochs=1, shuffle=False, packing=False, shard=(0, 1))
    with caplog.at_level(logging.WARNING):
        (batch,) = list(make_batch_iterator(good + [long], spec, overflow="drop", **kw))
    assert int(batch["segment_ids"].max(-1).sum()) == 3
    assert "dropped record 'long': longer than max_len=96" in caplog.text
    (batch,) = list(make_batch_iterator(good + [long], spec, overflow="truncate", **kw))
    assert (batch["segment_ids"][3] == 1).all() and (batch["loss_mask"][3] > 0).any()


def test_template_rendering_matches_transformers_apply_chat_template(hf_tokenizer):
    from pathor1_jax.data.chat_template import messages_to_json, template_text

    chat = _chat()
    messages = messages_to_json(chat.messages)
    hf = hf_tokenizer.apply_chat_template(messages, chat_template=template_text(), tokenize=False)
    assert hf == render_messages(chat.messages) == EXPECTED_TEXT
    hf_prompt = hf_tokenizer.apply_chat_template(
        messages[1:2], chat_template=template_text(), tokenize=False, add_generation_prompt=True
    )
    assert hf_prompt == render_messages(chat.messages[1:2], add_generation_prompt=True)


def test_array_record_source_gives_the_same_batches_as_jsonl(spec, tmp_path):
    from pathor1_jax.data.array_record import ArrayRecordSource, write_array_record

    records = demo_records("caption", "train")[:10]
    write_array_record({"train": records}, tmp_path)
    kw = dict(batch_size=2, max_len=256, seed=0, num_epochs=1, shard=(0, 1))
    from_jsonl = list(make_batch_iterator(records, spec, **kw))
    from_ar = list(make_batch_iterator(ArrayRecordSource(tmp_path, "train"), spec, **kw))
    assert len(from_jsonl) == len(from_ar) > 1
    for a, b in zip(from_jsonl, from_ar, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_mcq_prompt_ends_with_the_generation_prompt(proc):
    mcq = demo_records("mcq", "test")[0]
    ex = proc.encode_prompt(mcq)
    text = proc.tokenizer.decode(ex["input_ids"])
    assert text.startswith("<|im_start|>system\nYou are a pathology expert, your task is to answer question")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n") and " /n A. " in text
    assert (ex["labels"] == IGNORE_INDEX).all() and ex["mm_token_type_ids"].sum() == 4

"""The Qwen2 tokenizer and the Qwen2-VL image processor without transformers give what transformers
gives: the same ids, offsets, special-token handling and decoded text on the real Qwen2 tokenizer
files, and bit-identical pixel patches and grids; a processor config written by either loads in the
other; settings not implemented are refused by name; and the processes that use them do not import
transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pathor1_jax.data.pipeline import default_tokenizer_path
from pathor1_jax.data.processing import load_image_processor, load_tokenizer

TEXTS = [
    "Hello world",
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>\n",
    "text with <|im_end|> inside and <|endoftext|>",
    "Ünïcödé  spaces\t\ttabs\n\nnewlines 12345 ١٢٣ 中文字符 😀 e\u0301",
    " leading space, trailing  ",
    "<tool_call>x</tool_call> <|fim_prefix|> <think>pink</think><answer>H&E</answer>",
    "a" * 50 + "  <|image_pad|><|image_pad|>",
]


@pytest.fixture(scope="module")
def tokenizers():
    from transformers import AutoTokenizer

    path = default_tokenizer_path()
    return load_tokenizer(path), AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_matches_transformers(tokenizers, text):
    ours, hf = tokenizers
    for split in (False, True):  # special-token strings as control tokens / as text
        kw = dict(add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=split)
        a, b = ours(text, **kw), hf(text, **kw)
        assert a["input_ids"] == b["input_ids"], split
        assert [tuple(o) for o in a["offset_mapping"]] == [tuple(o) for o in b["offset_mapping"]], split
    ids = hf(text)["input_ids"]
    assert ours(text)["input_ids"] == ids
    for skip in (False, True):
        assert ours.decode(np.asarray(ids), skip_special_tokens=skip) == hf.decode(
            ids, skip_special_tokens=skip
        )


def test_tokenizer_special_tokens_and_ids_match_transformers(tokenizers):
    ours, hf = tokenizers
    assert ours.all_special_tokens == tuple(sorted(hf.all_special_tokens, key=hf.convert_tokens_to_ids))
    assert ours.pad_token_id == hf.pad_token_id == 151643
    for token in ("<|image_pad|>", "<|im_end|>", "<think>", "hello"):
        assert ours.convert_tokens_to_ids(token) == hf.convert_tokens_to_ids(token), token


def test_tokenizer_from_vocab_and_merges_only(tmp_path, tokenizers):
    ours, _ = tokenizers
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((Path(default_tokenizer_path()) / name).read_bytes())
    slow = load_tokenizer(tmp_path)  # no tokenizer.json: transformers builds the BPE
    for text in TEXTS:
        assert slow(text)["input_ids"] == ours(text)["input_ids"], text
    assert slow.pad_token_id == ours.pad_token_id


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


# (width, height, min_pixels, max_pixels): kept, rounded, shrunk to max_pixels, grown to min_pixels,
# long and thin, the Qwen2.5-VL defaults
SIZES = [(56, 56, 56 * 56, 112 * 112), (100, 61, 56 * 56, 112 * 112), (300, 200, 56 * 56, 112 * 112),
         (20, 30, 56 * 56, 112 * 112), (400, 29, 56 * 56, 28 * 28 * 64), (224, 180, None, None)]  # fmt: skip


@pytest.mark.parametrize("width,height,min_pixels,max_pixels", SIZES)
def test_image_processor_matches_transformers(width, height, min_pixels, max_pixels):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    kw = {k: v for k, v in dict(min_pixels=min_pixels, max_pixels=max_pixels).items() if v is not None}
    images = [_image(width, height), _image(height, width, seed=1)]
    ours = load_image_processor(None, **kw)(images)
    hf = Qwen2VLImageProcessorPil(**kw)(images=images, return_tensors="np")
    assert ours["pixel_values"].dtype == np.float32
    np.testing.assert_array_equal(ours["pixel_values"], hf["pixel_values"])
    np.testing.assert_array_equal(ours["image_grid_thw"], hf["image_grid_thw"])


def test_image_processor_config_round_trips_with_transformers(tmp_path):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    images = [_image(150, 90)]
    load_image_processor(None, min_pixels=56 * 56, max_pixels=112 * 112).save_pretrained(tmp_path / "ours")
    hf = Qwen2VLImageProcessorPil.from_pretrained(tmp_path / "ours")
    assert (hf.size["shortest_edge"], hf.size["longest_edge"]) == (56 * 56, 112 * 112)
    Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 9).save_pretrained(tmp_path / "hf")
    ours = load_image_processor(tmp_path / "hf")
    assert (ours.min_pixels, ours.max_pixels) == (28 * 28 * 4, 28 * 28 * 9)
    np.testing.assert_array_equal(
        ours(images)["pixel_values"],
        Qwen2VLImageProcessorPil.from_pretrained(tmp_path / "hf")(images, return_tensors="np")[
            "pixel_values"
        ],
    )
    # the Hub's Qwen2.5-VL files name the limits at the top level; arguments override the file
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub/preprocessor_config.json").write_text(
        json.dumps({"min_pixels": 3136, "max_pixels": 6272})
    )
    assert load_image_processor(tmp_path / "hub").max_pixels == 6272
    assert load_image_processor(tmp_path / "hub", max_pixels=12544).max_pixels == 12544


def test_image_processor_refuses_settings_it_does_not_implement(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"do_normalize": False}))
    with pytest.raises(ValueError, match=r"preprocessor_config.json: do_normalize=False is not supported"):
        load_image_processor(tmp_path)
    with pytest.raises(ValueError, match="absolute aspect ratio must be smaller than 200"):
        load_image_processor(None)([_image(1000, 4)])


def test_a_process_that_tokenizes_and_processes_images_imports_no_transformers():
    code = (
        "import sys\n"
        "from PIL import Image\n"
        "from pathor1_jax.data.pipeline import default_tokenizer_path\n"
        "from pathor1_jax.data.processing import QwenVLProcessor\n"
        "proc = QwenVLProcessor(default_tokenizer_path(), min_pixels=3136, max_pixels=3136)\n"
        "proc.image_processor([Image.new('RGB', (56, 56))])\n"
        "print(proc.tokenizer('hi')['input_ids'], 'transformers' in sys.modules, 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[6023]", "False", "False"], out

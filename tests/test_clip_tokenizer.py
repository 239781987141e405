"""Our CLIP tokenizer against open_clip's own `tokenizer.py`, loaded from the open-clip-torch wheel's
file by path when it is present (open_clip's package cannot be imported here: it needs torchvision),
and on hand-checked ids otherwise."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

from pathor1_jax.models.clip.tokenizer import CLIPTokenizer

CAPTIONS = [
    "H&E stained section of colon adenocarcinoma with cribriform glands.",
    "Immunohistochemistry: DAB-positive nuclei (Ki-67 ≈ 40%), hematoxylin counterstain.",
    "Café-au-lait macules — naïve B cells; 5 µm section, ×400 magnification.",
    "  Multiple   spaces\tand\nnewlines &amp; HTML entities &lt;b&gt;  ",
    "腺癌 组织 病理 图像",
    "Ÿ̶ùnicode combining marks and emoji 🔬🧫",
    "a long caption " + "with many repeated words " * 30,
    "",
]


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer()


def test_special_tokens_and_padding(tokenizer):
    ids = tokenizer(["a photo"])
    assert ids.shape == (1, 77)
    assert ids[0, 0] == 49406 and tokenizer.vocab_size == 49408
    assert list(ids[0, :4]) == [49406, 320, 1125, 49407]  # "a</w>" = 320, "photo</w>" = 1125 in CLIP's vocab
    assert (ids[0, 4:] == 0).all()


def test_truncation_keeps_end_of_text(tokenizer):
    ids = tokenizer([CAPTIONS[6]])[0]
    assert (ids != 0).all() and ids[-1] == 49407


def _open_clip_tokenizer():
    default = Path(__file__).resolve().parents[1] / ".venv" / "open_clip_ref" / "open_clip"  # see Makefile
    wheel_dir = os.environ.get("OPEN_CLIP_SRC", str(default))
    source = Path(wheel_dir) / "tokenizer.py"
    if not source.exists():
        pytest.skip(f"open_clip's tokenizer.py not found at {source} (set OPEN_CLIP_SRC)")
    spec = importlib.util.spec_from_file_location("open_clip_tokenizer", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer(str(Path(wheel_dir) / "bpe_simple_vocab_16e6.txt.gz"))


def test_same_ids_as_open_clip(tokenizer):
    reference = _open_clip_tokenizer()
    np.testing.assert_array_equal(tokenizer(CAPTIONS), reference(CAPTIONS).numpy())

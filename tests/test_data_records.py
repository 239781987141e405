"""Record schemas, JSONL / ArrayRecord readers, image decoding and the embedded demo data."""

import base64
import io
import json
import os
import re

import grain
import numpy as np
import pytest
from PIL import Image

from pathor1_jax.data import build_demo_data as bdd
from pathor1_jax.data.demo import demo_dir, demo_records, tile_class
from pathor1_jax.data.images import ImageDecodeError, load_image
from pathor1_jax.data.jsonl import read_jsonl, read_jsonl_files, write_jsonl
from pathor1_jax.data.prompts import PROMPT_STYLES
from pathor1_jax.data.records import (
    CaptionRecord,
    ChatRecord,
    ImageRef,
    MCQRecord,
    RecordError,
    parse_record,
    record_to_json,
)


def _png_bytes(color=(200, 30, 60), size=(28, 28)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


CHAT = {
    "id": "c1",
    "messages": [
        {"role": "system", "content": "You are a pathologist."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What stain?"}]},
        {"role": "assistant", "content": "<think>pink</think><answer>H&E</answer>"},
    ],
    "images": ["tile.png"],
    "subfield": "histopathology",
    "difficulty": "easy",
    "task": "MCQ",
}
CAPTION = {"id": "p1", "image": "tile.png", "caption": "An H&E tile."}
MCQ = {
    "id": "m1",
    "image": "tile.png",
    "question": "Which stain?",
    "options": {"A": "H&E", "B": "IHC"},
    "answer": "B",
    "subfield": "IHC",
}


@pytest.fixture
def data_dir(tmp_path):
    (tmp_path / "tile.png").write_bytes(_png_bytes())
    return tmp_path


def _write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_parse_and_roundtrip_all_kinds():
    chat = parse_record("chat", CHAT, "x")
    assert isinstance(chat, ChatRecord) and chat.task == "MCQ" and chat.difficulty == "easy"
    assert chat.all_images() == (ImageRef(path="tile.png"),) and chat.num_placeholders() == 1
    cap = parse_record("caption", CAPTION, "x")
    assert isinstance(cap, CaptionRecord) and cap.image.path == "tile.png"
    mcq = parse_record("mcq", MCQ, "x")
    assert isinstance(mcq, MCQRecord) and mcq.answer == "B" and mcq.images == (ImageRef(path="tile.png"),)
    for kind, obj in (("chat", CHAT), ("caption", CAPTION), ("mcq", MCQ)):
        record = parse_record(kind, obj, "x")
        assert parse_record(kind, record_to_json(record), "y") == record


def test_inline_bytes_image():
    data = _png_bytes()
    obj = dict(CAPTION, image={"bytes_b64": base64.b64encode(data).decode()})
    record = parse_record("caption", obj, "x")
    assert record.image.data == data
    assert load_image(record.image, record_id=record.id).size == (28, 28)


@pytest.mark.parametrize(
    "kind, obj, field",
    [
        ("caption", {"id": "a", "image": "x.png"}, "caption"),
        ("caption", {"id": "a", "caption": "c"}, "image"),
        ("chat", {"id": "a", "messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        ("chat", {"id": "a", "messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
        ("chat", dict(CHAT, messages=[{"role": "user", "content": [{"type": "video"}]}]), "content[0]"),
        ("mcq", dict(MCQ, answer="C"), "answer"),
        ("mcq", dict(MCQ, options={"A": "x", "C": "y"}), "contiguous"),
        ("mcq", dict(MCQ, options={"A": "x"}), "options"),
    ],
)
def test_schema_errors_name_the_field(kind, obj, field):
    with pytest.raises(RecordError, match=re.escape(field)):
        parse_record(kind, obj, "f.jsonl:7")
    with pytest.raises(RecordError, match=r"^f\.jsonl:7"):
        parse_record(kind, obj, "f.jsonl:7")


def test_jsonl_reader_resolves_paths_and_skips_blank_lines(data_dir):
    path = _write_lines(data_dir / "a.jsonl", [json.dumps(CHAT), "", json.dumps(dict(CHAT, id="c2"))])
    records = read_jsonl(path, "chat")
    assert [r.id for r in records] == ["c1", "c2"]
    assert records[0].images[0].path == str(data_dir / "tile.png")


def test_malformed_json_names_file_and_line(data_dir):
    path = _write_lines(data_dir / "bad.jsonl", [json.dumps(CAPTION), "", '{"id": "p2", "image": '])
    with pytest.raises(RecordError, match=re.escape(f"{path}:3: malformed JSON")):
        read_jsonl(path, "caption")


def test_invalid_record_names_file_line_and_field(data_dir):
    bad = dict(CAPTION, id="p2")
    del bad["caption"]
    path = _write_lines(data_dir / "bad.jsonl", [json.dumps(CAPTION), json.dumps(bad)])
    with pytest.raises(RecordError, match=re.escape(f"{path}:2 (record 'p2'): missing field 'caption'")):
        read_jsonl(path, "caption")


def test_duplicate_ids_are_errors(data_dir):
    path = _write_lines(data_dir / "dup.jsonl", [json.dumps(CAPTION), json.dumps(CAPTION)])
    with pytest.raises(RecordError, match=re.escape(f"{path}:2: duplicate id 'p1' (first on line 1)")):
        read_jsonl(path, "caption")
    other = _write_lines(data_dir / "b.jsonl", [json.dumps(CAPTION)])
    first = _write_lines(data_dir / "a.jsonl", [json.dumps(CAPTION)])
    with pytest.raises(RecordError, match="duplicate id 'p1'"):
        read_jsonl_files([first, other], "caption")


def test_corrupt_and_missing_images_name_the_record(data_dir):
    (data_dir / "broken.png").write_bytes(_png_bytes()[:40])
    with pytest.raises(ImageDecodeError, match=r"record 'r9': cannot decode image .*broken\.png"):
        load_image(ImageRef(path=str(data_dir / "broken.png")), record_id="r9")
    with pytest.raises(ImageDecodeError, match=r"record 'r8': cannot decode image .*nothere\.png"):
        load_image(ImageRef(path=str(data_dir / "nothere.png")), record_id="r8")
    with pytest.raises(ImageDecodeError, match=r"record 'r7': cannot decode image inline bytes"):
        load_image(ImageRef(data=b"not an image"), record_id="r7")


def test_write_jsonl_roundtrip(data_dir):
    records = read_jsonl(_write_lines(data_dir / "a.jsonl", [json.dumps(MCQ)]), "mcq")
    write_jsonl(data_dir / "b.jsonl", records)
    assert read_jsonl(data_dir / "b.jsonl", "mcq") == records
    assert not os.path.exists(data_dir / "b.jsonl.tmp")


def test_array_record_roundtrip_through_tfds_and_grain(data_dir):
    from pathor1_jax.data.array_record import ArrayRecordSource, write_array_record

    chats = read_jsonl(
        _write_lines(data_dir / "c.jsonl", [json.dumps(CHAT), json.dumps(dict(CHAT, id="c2"))]), "chat"
    )
    inline = parse_record(
        "chat", dict(CHAT, id="c3", images=[{"bytes_b64": base64.b64encode(b"raw").decode()}]), "x"
    )
    write_array_record({"train": chats + [inline], "test": chats[:1]}, data_dir / "ar")
    files = os.listdir(data_dir / "ar" / "patho_records" / "1.0.0")
    assert any(".array_record" in f for f in files)
    source = ArrayRecordSource(data_dir / "ar", "train")
    assert len(source) == 3 and len(ArrayRecordSource(data_dir / "ar", "test")) == 1
    read = list(grain.MapDataset.source(source))
    assert [r.id for r in read] == ["c1", "c2", "c3"]  # written order is kept
    assert read[0].messages == chats[0].messages and read[0].task == "MCQ"
    assert read[0].images == (ImageRef(data=_png_bytes()),)  # the file's bytes, embedded
    assert read[2].images == (ImageRef(data=b"raw"),)
    with pytest.raises(KeyError, match="no split 'val'"):
        ArrayRecordSource(data_dir / "ar", "val")


def name_of(record_id: str) -> str:
    return bdd.SOURCES[tile_class(record_id)]["tissue"].capitalize()


def test_demo_data_answers_follow_from_the_pixels():
    files = os.listdir(demo_dir())
    assert "LICENSE.txt" in files and "manifest.json" in files
    tiles = os.listdir(os.path.join(demo_dir(), "tiles"))
    assert len(tiles) == 480
    assert sum(os.path.getsize(os.path.join(demo_dir(), "tiles", t)) for t in tiles) < 3_000_000
    kinds = ("caption", "name", "chat", "mcq")
    counts = {(k, s): len(demo_records(k, s)) for k in kinds for s in ("train", "test")}
    # every tile: a descriptive caption and the tissue's name. A held-out tile: a chat per question
    # (tissue, density) and one of the name caption, one MCQ. A training tile: the same three chats
    # (SFT's), or, one in RL_EVERY, its two MCQs and no chat (RL's: 43 of each source's 130)
    rl_tiles = 3 * len(range(bdd.RL_EVERY - 1, 130, bdd.RL_EVERY))
    assert counts == {
        ("caption", "train"): 390, ("name", "train"): 390, ("chat", "train"): 3 * (390 - rl_tiles),
        ("mcq", "train"): 2 * rl_tiles,
        ("caption", "test"): 90, ("name", "test"): 90, ("chat", "test"): 3 * 90, ("mcq", "test"): 90,
    }  # fmt: skip
    for split in ("train", "test"):  # the name caption names the tissue; the tissue chat's reasoning
        for name in demo_records("name", split):  # is the name of the option its answer letter names
            assert name.caption == name_of(name.id) + ".", name.id
        for chat in demo_records("chat", split):
            if "-tissue-" in chat.id:
                assert chat.messages[-1].content.startswith(f"<think>\n{name_of(chat.id)}</think>"), chat.id
    train_tiles = {r.image.path for r in demo_records("caption", "train")}
    test_tiles = {r.image.path for r in demo_records("caption", "test")}
    rl_prompts = {r.images[0].path for r in demo_records("mcq", "train")}
    sft_chats = {image.path for c in demo_records("chat", "train") for image in c.all_images()}
    assert not train_tiles & test_tiles
    assert len(rl_prompts) == rl_tiles and rl_prompts <= train_tiles and not rl_prompts & sft_chats
    checked = 0
    for mcq in demo_records("mcq", "test"):
        pixels = np.asarray(load_image(mcq.images[0], record_id=mcq.id))
        answer = mcq.options[mcq.answer]
        if mcq.question.startswith("How densely"):
            assert answer == bdd.density_label(bdd.tissue_fraction(pixels)), mcq.id
            checked += 1
        else:
            assert answer == bdd.SOURCES[tile_class(mcq.id)]["tissue"], mcq.id
    chats = [c for c in demo_records("chat", "train") if c.task == "MCQ"]
    assert len(chats) == 2 * (390 - rl_tiles)
    assert {c.messages[0].content for c in chats} == {PROMPT_STYLES["patho_r1"].system}  # the official prompt
    assert checked > 20


def test_demo_reasoning_names_the_tissue_in_its_first_token():
    """The SFT chats' first reasoning token tells the tissue apart and no other reasoning starts with
    it: when the density's reasoning began with `Tissue` (first token `T`, as `Tumour`'s), the demo's
    SFT model began every tissue answer with `Tumour`."""
    from pathor1_jax.data.pipeline import default_tokenizer_path
    from pathor1_jax.data.qwen_preprocessing import QwenTokenizer

    tokenizer = QwenTokenizer.from_dir(default_tokenizer_path())
    first = {}  # first token after <think> -> the kinds of chat that start with it
    for chat in demo_records("chat", "train"):
        if chat.task != "MCQ":
            continue
        think = chat.messages[-1].content.removeprefix("<think>\n")
        token = tokenizer(think, add_special_tokens=False)["input_ids"][0]
        kind = name_of(chat.id) if "-tissue-" in chat.id else "density"
        first.setdefault(token, set()).add(kind)
    assert sorted(map(sorted, first.values())) == [["Colon"], ["Skin"], ["Tumour"], ["density"]]


def test_demo_held_out_tiles_look_like_the_training_tiles():
    """The held-out tiles come from blocks spread over each image: their share of dense tiles is
    close to the training tiles' (a strip at the image's edge gave 29% against 64%)."""
    dense = {}
    for split in ("train", "test"):
        labels = [
            bdd.density_label(bdd.tissue_fraction(np.asarray(load_image(r.image, record_id=r.id))))
            for r in demo_records("caption", split)
        ]
        dense[split] = labels.count("dense") / len(labels)
    assert abs(dense["train"] - dense["test"]) < 0.15, dense

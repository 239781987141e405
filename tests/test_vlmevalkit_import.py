"""VLMEvalKit TSV → mcq / vqa records, on files the test writes (base64 images), and the vqa schema."""

import base64
import csv
import io

import pytest
from PIL import Image

from pathor1_jax.cli import main
from pathor1_jax.data.images import load_image
from pathor1_jax.data.jsonl import read_jsonl
from pathor1_jax.data.records import MCQRecord, RecordError, VQARecord, parse_record, record_to_json
from pathor1_jax.data.vlmevalkit import read_vlmevalkit_tsv


def _png(color) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="PNG")
    return buffer.getvalue()


RED, BLUE = _png((255, 0, 0)), _png((0, 0, 255))
B64_RED, B64_BLUE = base64.b64encode(RED).decode(), base64.b64encode(BLUE).decode()
HEADER = ["index", "image", "question", "hint", "A", "B", "C", "D", "E", "answer", "category", "l2-category",
          "split"]  # fmt: skip


def _write_tsv(path, rows, header=HEADER):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t")  # pandas' to_csv(sep="\t") quoting
        writer.writerow(header)
        for row in rows:
            writer.writerow([row.get(c, "") for c in header])
    return path


ROWS = [
    dict(index=11, image=B64_RED, question='Which "stain"?\tTabbed.', A="H&E", B="IHC", C="PAS", D="Giemsa",
         answer="B", category="Atlas", **{"l2-category": "IHC"}, split="val"),
    dict(index=12, image="11", question="Same tile: organ?", hint="Colon biopsy.", A="Colon", B="Skin",
         answer="A", category="PubMed", split="val"),  # image shared with row 11
    dict(index=13, image=str([B64_RED, B64_BLUE]), question="Two tiles: same case?", answer="Yes"),
    dict(index=14, image=B64_BLUE, question="What is shown?", answer="Lymphoid infiltrate"),
    dict(index=15, image="", question="No image row", answer="no"),  # dropped, as VLMEvalKit does
]  # fmt: skip


def test_import_mcq_and_vqa_rows(tmp_path):
    result = read_vlmevalkit_tsv(_write_tsv(tmp_path / "PathMMU_VAL.tsv", ROWS))
    assert result.counts() == {"mcq": 2, "yes_no": 1, "open": 1, "skipped_no_image": 1}
    first, second, pair, open_q = result.records
    assert isinstance(first, MCQRecord) and first.id == "11" and first.benchmark == "PathMMU_VAL"
    assert first.question == 'Which "stain"?\tTabbed.'  # quoted cell with a tab and quotes survives
    assert first.options == {"A": "H&E", "B": "IHC", "C": "PAS", "D": "Giemsa"} and first.answer == "B"
    assert (first.category, first.l2_category, first.split) == ("Atlas", "IHC", "val")
    assert first.images[0].data == RED
    assert second.images[0].data == RED and second.options == {"A": "Colon", "B": "Skin"}
    assert second.question == "Hint: Colon biopsy.\nSame tile: organ?"
    assert isinstance(pair, VQARecord) and pair.answer_type == "yes_no" and pair.answer == "yes"
    assert [i.data for i in pair.images] == [RED, BLUE]
    assert open_q.answer_type == "open" and open_q.answer == "Lymphoid infiltrate"
    assert load_image(open_q.images[0], record_id="14").getpixel((0, 0)) == (0, 0, 255)


def test_benchmark_name_and_text_only_files(tmp_path):
    header = ["index", "question", "A", "B", "answer"]
    path = _write_tsv(tmp_path / "x.tsv", [dict(index=1, question="2+2?", A="4", B="5", answer="A")], header)
    (record,) = read_vlmevalkit_tsv(path, benchmark="MedXpertQA").records
    assert record.benchmark == "MedXpertQA" and record.images == ()


@pytest.mark.parametrize(
    "row, header, message",
    [
        (
            dict(index=1, image="!!notbase64!!" * 8, question="q", A="x", B="y", answer="A"),
            HEADER,
            r"x.tsv:2 \(record '1'\): field 'images\[0\]': invalid base64",
        ),
        (
            dict(index=1, image="99", question="q", A="x", B="y", answer="A"),
            HEADER,
            "neither base64 nor the index of a row holding an image",
        ),
        (
            dict(index=1, image=B64_RED, question="q", A="x", B="y", answer="C"),
            HEADER,
            r"x.tsv:2 \(record '1'\): field 'answer' must be one of \['A', 'B'\]",
        ),
        (
            dict(index=1, image=B64_RED, question="q", A="x", B="y", G="z", answer="A"),
            [*HEADER, "G"],
            "option G: at most 6 options",
        ),
        (dict(index=1, image=B64_RED, question="q", answer=""), HEADER, "field 'answer' must be a non-empty"),
        (dict(index=1, question="q"), ["index", "question"], r"no column\(s\) \['answer'\]"),
    ],
)
def test_bad_rows_are_errors_naming_file_line_and_record(tmp_path, row, header, message):
    with pytest.raises(RecordError, match=message):
        read_vlmevalkit_tsv(_write_tsv(tmp_path / "x.tsv", [row], header))


def test_import_command_writes_jsonl_that_reads_back(tmp_path, capsys):
    tsv = _write_tsv(tmp_path / "PathMMU_VAL.tsv", ROWS)
    out_mcq, out_vqa = tmp_path / "mcq.jsonl", tmp_path / "vqa.jsonl"
    assert main(["eval", "import-tsv", str(tsv), "--mcq-out", str(out_mcq), "--vqa-out", str(out_vqa)]) == 0
    assert '"mcq": 2' in capsys.readouterr().out
    expected = read_vlmevalkit_tsv(tsv).records
    assert read_jsonl(out_mcq, "mcq") + read_jsonl(out_vqa, "vqa") == expected


def test_vqa_schema():
    obj = {"id": "v", "image": "t.png", "question": "IHC?", "answer": " YES ", "answer_type": "yes_no",
           "benchmark": "PathVQA", "split": "test"}  # fmt: skip
    record = parse_record("vqa", obj, "f:1")
    assert record.answer == "yes" and record.benchmark == "PathVQA"
    assert parse_record("vqa", record_to_json(record), "y") == record
    with pytest.raises(RecordError, match="f:1 .record 'v'.: field 'answer' of a yes_no question"):
        parse_record("vqa", {**obj, "answer": "maybe"}, "f:1")
    with pytest.raises(RecordError, match="field 'answer_type' must be one of"):
        parse_record("vqa", {**obj, "answer_type": "closed"}, "f:1")
    opened = parse_record("vqa", {**obj, "answer": "Mitosis", "answer_type": "open", "reasoning": "r"}, "x")
    assert opened.answer == "Mitosis" and opened.reasoning == "r"
    mcq = parse_record("mcq", {"id": "m", "question": "q", "options": {"A": "a", "B": "b"}, "answer": "A",
                               "category": "Atlas", "split": "test_tiny"}, "x")  # fmt: skip
    assert (mcq.category, mcq.split) == ("Atlas", "test_tiny")
    assert record_to_json(mcq)["category"] == "Atlas"

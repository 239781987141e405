"""extract on the generated book (3 born-digital pages) and its scanned, rotated, noisy twin: figures,
panels, letters, captions, in-line references against the generator's truth; bad PDFs; idempotent
reruns; the Beam runner's output equals the local runner's.

The book is made and extracted once per module (OCR of a page takes seconds on 2 cores)."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("rapidocr")
pytest.importorskip("reportlab")

from pathor1_jax.curation.demo import _cer as cer  # noqa: E402
from pathor1_jax.curation.demo_book import make_book  # noqa: E402
from pathor1_jax.curation.extract import _iou, extract_pdf  # noqa: E402
from pathor1_jax.curation.io import read_jsonl, write_jsonl  # noqa: E402
from pathor1_jax.curation.steps import Runner, run_extract, run_filter, run_qc  # noqa: E402


@pytest.fixture(scope="module")
def book(tmp_path_factory):
    root = tmp_path_factory.mktemp("book")
    truth = make_book(str(root))
    out = root / "extract"
    results = {name: extract_pdf(str(root / name), str(out)) for name in ("book.pdf", "book_scanned.pdf")}
    return root, truth, results


def expected_units(truth_pages):
    """(page, figure, panel letter or None, bbox, caption, inline refs) of every pair the truth implies."""
    out = []
    for page in truth_pages:
        for fig in page["figures"]:
            if fig["panels"]:
                for p in fig["panels"]:
                    out.append(
                        (
                            page["page"],
                            fig["figure"],
                            p["letter"],
                            p["bbox"],
                            f"{fig['lead']} {p['text']}",
                            fig["inline_refs"][p["letter"]],
                        )
                    )
            else:
                out.append(
                    (page["page"], fig["figure"], None, fig["bbox"], fig["lead"], fig["inline_refs"][""])
                )
    return out


@pytest.mark.parametrize("name", ["book.pdf", "book_scanned.pdf"])
def test_every_pair_found_with_its_box_letter_caption_and_references(book, name):
    root, truth, results = book
    records, report = results[name]
    expected = expected_units(truth[name])
    got = {(r["page"], r["figure"], r["panel"]): r for r in records}
    assert set(got) == {(p, f, letter) for p, f, letter, *_ in expected}  # precision and recall 1
    for page, fig, letter, bbox, caption, refs in expected:
        r = got[(page, fig, letter)]
        assert _iou(r["bbox"], bbox) >= 0.8, (fig, letter, r["bbox"], bbox)
        if name == "book.pdf":
            assert r["caption"] == caption
        else:
            assert cer(r["caption"], caption) <= 0.05, (r["caption"], caption)
        assert r["inline_refs"] == refs
        assert os.path.exists(root / "extract" / r["image"]) and r["source"] == name
    assert report.counts["pairs"] == len(expected) and "panel_mismatch" not in report.counts
    if name == "book_scanned.pdf":
        assert report.counts["pages_ocr"] == 1 and report.counts["pages_scanned"] == 1


def test_extracted_pairs_are_caption_records(book):
    from pathor1_jax.data.records import CaptionRecord, parse_record

    root, _, results = book
    for r in results["book.pdf"][0]:
        rec = parse_record("caption", r, "pairs.jsonl")
        assert isinstance(rec, CaptionRecord) and rec.caption == r["caption"]


def test_demo_scores_pairs_against_the_truth_and_reports_them_as_a_stage(book, tmp_path, monkeypatch):
    """`pathor1 demo`'s curation row: recall and precision of the pairs against the book's truth."""
    from pathor1_jax.curation import demo

    _, truth, results = book
    records = results["book.pdf"][0] + results["book_scanned.pdf"][0]
    result = demo.score(records, truth)
    assert (result["extracted"], result["expected"], result["precision"], result["recall"]) == (11, 11, 1, 1)
    moved = {**records[0], "bbox": [b + 60 for b in records[0]["bbox"]]}  # IoU < 0.8: a miss
    extra = {**records[1], "panel": "Z"}  # a pair the truth does not have
    result = demo.score([moved, extra, *records[1:-1]], truth)  # and the last pair lost
    assert (result["extracted"], result["precision"], result["recall"]) == (11, 9 / 11, 9 / 11)
    assert [r["found"] for r in result["rows"]].count(False) == 2
    assert "pairs: 11 extracted, 11 in the truth; precision 0.82, recall 0.82" in demo.table(result)

    monkeypatch.setattr(demo, "run_demo", lambda out: result)
    stage = demo.demo_stage(tmp_path)
    assert (stage.stage, stage.metric, stage.first, stage.last, stage.metrics_path) == (
        "curation", "recall", None, 9 / 11, None
    )  # fmt: skip
    assert stage.note == "9 of 11 true pairs found, 11 extracted: precision 0.82"


def test_bad_pdfs_are_logged_and_counted_not_fatal(tmp_path):
    from reportlab.pdfgen.canvas import Canvas

    pdfs = tmp_path / "pdfs"
    pdfs.mkdir()
    (pdfs / "corrupt.pdf").write_bytes(b"%PDF-1.4\nnot really a pdf")
    c = Canvas(str(pdfs / "locked.pdf"), encrypt="secret")
    c.drawString(100, 700, "Fig. 1 A locked page.")
    c.save()
    table = run_extract(str(pdfs), str(tmp_path / "out"))
    report = json.loads((tmp_path / "out" / "extract_report.json").read_text())
    assert report["counts"]["bad:unreadable_pdf"] == 2
    assert sorted(p["where"] for p in report["problems"]) == ["corrupt.pdf", "locked.pdf"]
    assert "bad:unreadable_pdf" in table and read_jsonl(tmp_path / "out" / "pairs.jsonl") == []


def single_figure_pdf(path: str, tiles: list[str]) -> None:
    """A one-page PDF per tile with a single-panel figure (no letters: extraction needs no OCR)."""
    from reportlab.lib.utils import ImageReader
    from reportlab.pdfgen.canvas import Canvas

    c = Canvas(path, invariant=1)
    for i, tile in enumerate(tiles):
        c.setFont("Times-Roman", 10)
        c.drawString(72, 760, f"The lesion is shown in Fig. {i + 1}.1 at low power.")
        c.drawImage(ImageReader(tile), 72, 500, 200, 200)
        c.setFont("Helvetica", 8)
        c.drawString(72, 488, f"Fig. {i + 1}.1 Colonic mucosa with crypts, H&E stained section number {i}.")
        c.showPage()
    c.save()


@pytest.fixture(scope="module")
def small_pdfs(tmp_path_factory):
    from pathor1_jax.curation.demo_book import _dense_tiles

    root = tmp_path_factory.mktemp("small")
    tiles = _dense_tiles()
    (root / "pdfs").mkdir()
    single_figure_pdf(str(root / "pdfs" / "a.pdf"), tiles["ihc_colon"][:2])
    single_figure_pdf(
        str(root / "pdfs" / "b.pdf"), tiles["he_skin"][:1] + tiles["ihc_colon"][:1]
    )  # a duplicate
    return root


def test_rerun_skips_finished_units_and_output_is_stable(small_pdfs, monkeypatch):
    out = small_pdfs / "rerun"
    run_extract(str(small_pdfs / "pdfs"), str(out))
    first = (out / "pairs.jsonl").read_bytes()
    assert len(first.splitlines()) == 4

    def boom(*a, **k):
        raise AssertionError("a finished unit ran again")

    monkeypatch.setattr("pathor1_jax.curation.extract.extract_pdf", boom)
    run_extract(str(small_pdfs / "pdfs"), str(out))
    assert (out / "pairs.jsonl").read_bytes() == first
    assert not [p for p in os.listdir(out / "shards") if ".tmp" in p]


def assert_same_files(a, b, *, shards: bool = True) -> None:
    """Every file under directories `a` and `b` (outputs, reports, crops and, with `shards`, the unit
    shards and their reports) byte-equal."""
    files = {
        d: {
            p.relative_to(d).as_posix(): p
            for p in d.rglob("*")
            if p.is_file() and (shards or p.relative_to(d).parts[0] != "shards")
        }
        for d in (a, b)
    }
    assert sorted(files[a]) == sorted(files[b])
    for name, path in files[a].items():
        assert path.read_bytes() == files[b][name].read_bytes(), name


def test_filter_dedups_the_repeated_tile_and_beam_equals_local(small_pdfs):
    """The Beam DirectRunner and the local process pool write byte-identical outputs for extract,
    filter and qc (apache-beam is in the test extra: this test runs in CI, never skipped)."""
    local, via_beam = small_pdfs / "local", small_pdfs / "beam"
    beam = Runner("beam", 1, ("--runner=DirectRunner",))
    run_extract(str(small_pdfs / "pdfs"), str(local / "extract"), Runner("local", 2))
    run_extract(str(small_pdfs / "pdfs"), str(via_beam / "extract"), beam)
    assert len(read_jsonl(local / "extract" / "pairs.jsonl")) == 4
    assert_same_files(local / "extract", via_beam / "extract")
    run_filter(str(local / "extract"), str(local / "filter"))
    run_filter(str(via_beam / "extract"), str(via_beam / "filter"), beam)
    # filter's unit shards name and hold their input directory (local/ or beam/): outputs compared
    assert_same_files(local / "filter", via_beam / "filter", shards=False)
    rejected = read_jsonl(local / "filter" / "rejected.jsonl")
    assert [r["reasons"] for r in rejected] == [["duplicate_exact"]]
    qc_in = small_pdfs / "qc_in.jsonl"
    answers = ["<think>a b c d e f g h i j</think><answer>B</answer>", "<answer>B</answer>"]  # 2nd: rejected
    write_jsonl(
        qc_in,
        [
            {
                "id": f"c{i}",
                "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}],
                "task": "reasoning",
                "caption": "x",
            }
            for i, answer in enumerate(answers)
        ],
    )
    run_qc(str(qc_in), str(local / "qc"))
    run_qc(str(qc_in), str(via_beam / "qc"), beam)
    passed, rejected = (read_jsonl(local / "qc" / name) for name in ("chat.jsonl", "rejected.jsonl"))
    assert [r["id"] for r in passed] == ["c0"] and [r["id"] for r in rejected] == ["c1"]
    assert_same_files(local / "qc", via_beam / "qc")


def test_llm_fallback_for_inline_refs_keeps_only_substrings(tmp_path):
    pytest.importorskip("openai")
    from fake_openai import FakeOpenAI, Reply
    from reportlab.lib.utils import ImageReader
    from reportlab.pdfgen.canvas import Canvas

    from pathor1_jax.curation.demo_book import _dense_tiles
    from pathor1_jax.curation.steps import LLMSpec

    pdfs = tmp_path / "pdfs"
    pdfs.mkdir()
    c = Canvas(str(pdfs / "noref.pdf"), invariant=1)
    c.setFont("Times-Roman", 10)
    c.drawString(72, 760, "The picture below shows regular colonic crypts. Nothing else is said here.")
    c.drawImage(ImageReader(_dense_tiles()["ihc_colon"][0]), 72, 500, 200, 200)
    c.setFont("Helvetica", 8)
    c.drawString(72, 488, "Fig. 7.1 Colonic mucosa with crypts, FHL2 immunostain.")
    c.save()
    quotes = '["The picture below shows regular colonic crypts.", "An invented sentence about Fig. 7.1."]'
    with FakeOpenAI([Reply(f"<think>Only the first one.</think>{quotes}")]) as server:
        run_extract(str(pdfs), str(tmp_path / "out"), llm=LLMSpec(server.url, "fake"))
        assert server.count == 1 and "refers to figure 7.1" in server.requests[0]["messages"][0]["content"]
    (pair,) = read_jsonl(tmp_path / "out" / "pairs.jsonl")
    assert pair["inline_refs"] == ["The picture below shows regular colonic crypts."]
    counts = json.loads((tmp_path / "out" / "extract_report.json").read_text())["counts"]
    assert counts["llm_refs_accepted"] == 1 and counts["llm_refs_rejected"] == 1

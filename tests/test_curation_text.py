"""Curation's pure pieces: caption parsing, in-line references, panel splitting, letters, layout rules."""

from __future__ import annotations

import numpy as np
import pytest

from pathor1_jax.curation.captions import (
    caption_label,
    citations,
    inline_references,
    is_substring_of,
    panel_caption,
    sentences,
    split_caption,
)
from pathor1_jax.curation.extract import ExtractConfig, Line, Page, body_text, find_captions, pair_figures
from pathor1_jax.curation.panels import assign_letters, panel_letter, split_panels


@pytest.mark.parametrize(
    "text, figure, lead, panels",
    [
        (
            "Fig. 13.1 Colonic mucosa. A Low-power view. B High-power view (×400).",
            "13.1",
            "Colonic mucosa.",
            {"A": "Low-power view.", "B": "High-power view (×400)."},
        ),
        (
            "Figure 12 Skin, H&E. (A) Epidermis. (B) Dermis. (C) Fat.",
            "12",
            "Skin, H&E.",
            {"A": "Epidermis.", "B": "Dermis.", "C": "Fat."},
        ),
        (
            "图13-19 纤维腺瘤 A. 裂隙状管内型;B. 腺管状管周型。",
            "13-19",
            "纤维腺瘤",
            {"A": "裂隙状管内型", "B": "腺管状管周型。"},
        ),
        (
            "FIG. 4-7: Gross. A. Cut surface; B. Capsule.",
            "4-7",
            "Gross.",
            {"A": "Cut surface", "B": "Capsule."},
        ),
        # "A" as an article, and a lone letter: not panels
        ("Fig. 4 A tumour with necrosis.", "4", "A tumour with necrosis.", {}),
        ("Fig. 5 Liver. B High power only.", "5", "Liver. B High power only.", {}),
    ],
)
def test_split_caption(text, figure, lead, panels):
    parts = split_caption(text)
    assert (parts.figure, parts.lead, parts.panels) == (figure, lead, panels)


def test_caption_label_and_panel_caption():
    assert caption_label("Table 3 Stains") is None and caption_label("The figure shows") is None
    parts = split_caption("Fig. 2.1 Lead text. A First. B Second.")
    assert panel_caption(parts, "B") == "Lead text. Second."
    assert panel_caption(parts, None) == "Lead text. A First. B Second."


def test_sentences_and_citations():
    text = (
        "The crypts are regular (Fig. 13.1A). Stain is brown\n(Fig. 13.1B), e.g. in cells. "
        "See Figs. 13.2A and B. "
        "Compare Figure 13.3 with 13.4. Panels A–C of Fig. 2.1 differ. 见图13-19A。其他。"
    )
    s = sentences(text)
    assert s == [
        "The crypts are regular (Fig. 13.1A).",
        "Stain is brown (Fig. 13.1B), e.g. in cells.",
        "See Figs. 13.2A and B.",
        "Compare Figure 13.3 with 13.4.",
        "Panels A–C of Fig. 2.1 differ.",
        "见图13-19A。",
        "其他。",
    ]
    assert citations(s[2]) == [("13.2", {"A", "B"})]
    assert citations(s[5]) == [("13-19", {"A"})]
    assert citations("(Figs. 13.3C–E)") == [("13.3", {"C", "D", "E"})]
    assert inline_references(s, "13.1", "A") == [s[0]]
    assert inline_references(s, "13.1", None) == s[:2]
    assert inline_references(s, "13.3", "B") == [s[3]]  # the whole figure is cited
    assert is_substring_of("Stain  is brown\n(Fig. 13.1B),", text) and not is_substring_of(
        "Stain is blue", text
    )
    assert not is_substring_of("  ", text)


def _tissue(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return rng.integers(60, 200, (h, w, 3), dtype=np.uint8)


def test_split_panels_gutter_separator_grid_and_single():
    rng = np.random.default_rng(0)
    fig = np.full((120, 260, 3), 255, np.uint8)
    fig[10:110, 5:125], fig[10:110, 135:255] = _tissue(rng, 100, 120), _tissue(rng, 100, 120)
    assert split_panels(fig) == [(5, 10, 125, 110), (135, 10, 255, 110)]
    grid = np.zeros((206, 206, 3), np.uint8)  # black separator lines of 6 px
    for y in (0, 106):
        for x in (0, 106):
            grid[y : y + 100, x : x + 100] = _tissue(rng, 100, 100)
    assert split_panels(grid) == [
        (0, 0, 100, 100),
        (106, 0, 206, 100),
        (0, 106, 100, 206),
        (106, 106, 206, 206),
    ]
    single = _tissue(rng, 80, 90)
    assert split_panels(single) == [(0, 0, 90, 80)]
    stripe = single.copy()
    stripe[:, 84:86] = 255  # a gutter 4 px from the edge: a stripe, not a panel
    assert split_panels(stripe) == [(0, 0, 90, 80)]


def test_panel_letters():
    assert [panel_letter(t) for t in ("A", "(b)", "C.", "AB", "Fig", "[D]")] == [
        "A",
        "B",
        "C",
        None,
        None,
        "D",
    ]
    panels = [(0, 0, 100, 100), (110, 0, 210, 100)]
    assert assign_letters(panels, [("B", 120, 10), ("A", 10, 10), ("Z", 500, 5)]) == {0: "A", 1: "B"}
    assert assign_letters(panels, [("A", 10, 10)]) is None  # one panel without a letter
    assert assign_letters(panels, [("A", 10, 10), ("A", 120, 10)]) is None  # the same letter twice
    # two letters in one panel: the one nearest its top-left corner
    assert assign_letters(panels[:1], [("B", 80, 80), ("A", 5, 5)]) == {0: "A"}


def test_caption_growth_pairing_and_two_column_body():
    # Page of 600 x 800 points, two columns split at x=300; a figure in the left column.
    L = Line
    lines = [
        L("Left column text cites (Fig. 3.1A) here.", 50, 100, 280, 110, 10),
        L("Right column text that continues", 320, 100, 560, 110, 10),
        L("Fig. 3.1 Lead. A One panel text", 50, 320, 280, 328, 8),
        L("Right column second line.", 320, 322, 560, 332, 10),
        L("wrapped. B Another panel.", 50, 331, 200, 339, 8),
        L("Body again, far below.", 50, 380, 280, 390, 10),
        L("Chapter 3 header", 50, 20, 200, 28, 8),
    ]
    page = Page(1, 600, 800, "born-digital", lines, [[50, 150, 280, 310], [320, 500, 560, 600]])
    cfg = ExtractConfig()
    caps = find_captions(page, cfg)
    assert len(caps) == 1 and caps[0].text == "Fig. 3.1 Lead. A One panel text wrapped. B Another panel."
    assert caps[0].parts.panels == {"A": "One panel text wrapped.", "B": "Another panel."}
    pairs = pair_figures(page, caps, cfg)
    assert [boxes for _, boxes in pairs] == [[[50, 150, 280, 310]]]  # not the right column's image
    body = body_text(page, caps, cfg)
    assert body == (
        "Left column text cites (Fig. 3.1A) here. Body again, far below. "
        "Right column text that continues Right column second line."
    )


def test_curate_cli_reports_bad_flags_and_input_as_one_line_exit_2(tmp_path, capsys):
    from pathor1_jax.cli import main

    assert main(["curate", "extract", "--in", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"pathor1 curate: error: {tmp_path / 'none'}: no such file or directory"
    )
    pdf = tmp_path / "a.pdf"
    pdf.write_bytes(b"%PDF-1.4")
    args = ["curate", "extract", "--in", str(pdf), "--out", str(tmp_path / "o")]
    assert main([*args, "--layout-dpi", "150", "--crop-dpi", "200"]) == 2
    assert "--crop-dpi 200.0 must be at least twice --layout-dpi 150.0" in capsys.readouterr().err
    assert main([*args, "--", "--runner=DirectRunner"]) == 2
    assert "are Beam flags: add --runner beam" in capsys.readouterr().err
    assert main(["curate", "filter", "--in", str(tmp_path), "--out", str(tmp_path / "f")]) == 2
    assert "pairs.jsonl does not exist" in capsys.readouterr().err


def test_filter_rules_one_by_one_and_exact_and_near_duplicates(tmp_path):
    """Each image and caption rule of `filter` on a crafted case; dedup keeps the first of an exact
    copy and of a near copy (brighter, JPEG re-encoded: a few dHash bits apart), never a flagged pair."""
    from PIL import Image

    from pathor1_jax.curation.demo_book import _dense_tiles
    from pathor1_jax.curation.filter import FilterConfig, caption_flags, check_records, dedup, image_flags
    from pathor1_jax.curation.io import Unit

    cfg = FilterConfig()
    tiles = _dense_tiles()["he_skin"]
    tissue, other = (
        np.asarray(Image.open(t).convert("RGB").resize((160, 160), Image.BICUBIC)) for t in tiles[:2]
    )
    assert image_flags(tissue, cfg) == []
    assert image_flags(tissue[:48, :], cfg) == ["too_small"]
    assert image_flags(np.tile(tissue, (1, 3, 1)), cfg) == []  # 160 x 480: long/short 3 <= 6
    assert image_flags(np.tile(tissue[:70], (1, 3, 1)), cfg) == ["aspect"]  # 70 x 480: 6.9 > 6
    grey = np.full((128, 128, 3), 128, np.uint8)
    assert image_flags(grey, cfg) == ["blank", "colour_chart"]
    page = np.full((128, 128, 3), 255, np.uint8)
    page[60:66, 60:66] = 0  # a speck on a white page
    assert image_flags(page, cfg) == ["mostly_white", "colour_chart"]
    chart = np.full((128, 128, 3), 255, np.uint8)
    chart[:, :64], chart[40:, 64:96] = (200, 30, 30), (30, 30, 200)  # flat bars
    assert image_flags(chart, cfg) == ["colour_chart"]

    assert caption_flags("Colonic mucosa with crypts, H&E.", "", cfg) == []
    assert caption_flags("H&E.", "", cfg) == ["caption_short"]
    assert caption_flags("word " * 401, "", cfg) == ["caption_long"]
    for lead in ("Table 3.1 Grading of dysplasia", "Schematic of the nephron", "Flow chart of the work-up"):
        assert caption_flags(f"{lead}: the steps and what each shows.", lead, cfg) == ["table_or_chart"]

    near = Image.fromarray(np.clip(tissue.astype(np.int16) + 6, 0, 255).astype(np.uint8))
    near.save(tmp_path / "near.jpg", quality=70)
    Image.fromarray(tissue).save(tmp_path / "a.png")
    Image.fromarray(tissue).save(tmp_path / "copy.png")
    Image.fromarray(other).save(tmp_path / "b.png")
    Image.fromarray(grey).save(tmp_path / "grey.png")
    caption = "Normal skin with epidermis and dermis, H&E."
    files = ["a.png", "near.jpg", "b.png", "copy.png", "grey.png", "missing.png"]
    payload = [{"id": f.split(".")[0], "image": f, "caption": caption} for f in files]
    records, report = check_records(Unit("t", "t", payload), cfg, str(tmp_path))
    dedup(records, cfg.near_bits)
    got = {r["id"]: (r["reasons"], r.get("duplicate_of")) for r in records}
    assert got == {
        "a": ([], None),
        "near": (["duplicate_near"], "a"),
        "b": ([], None),
        "copy": (["duplicate_exact"], "a"),
        "grey": (["blank", "colour_chart"], None),
        "missing": (["unreadable_image"], None),
    }
    assert report.counts["bad:unreadable_image"] == 1

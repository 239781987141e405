"""A textbook-like PDF made from the embedded demo tiles, with its scanned twin and the ground truth.

`make_book(out_dir)` writes
- `book.pdf`: 3 born-digital pages (reportlab): a one-column page with a two-panel figure of two
  separate images (13.1), a two-column page with a composite raster whose panels are split by a
  white gutter (13.2), and a page with a 2×2 grid split by black separator lines (13.3) above a
  single-panel figure (13.4); burnt-in panel letters, captions below the figures, headers, footers
  and body text citing the figures (`(Fig. 13.1A)`, `Figure 13.2B`, ...) on the same or the
  neighbouring page;
- `book_scanned.pdf`: page 1 rendered at `scan_dpi`, rotated by 0.7°, with noise, as an image-only
  PDF (no text layer);
- `truth.json`: per source and page, each figure's box, caption, lead, panels (letter, box, text) and
  the sentences citing it, in PDF points with a top-left origin (`[x0, top, x1, bottom]`).

All text is ours. Images: the demo tiles (see `data/assets/demo/LICENSE.txt`), upscaled.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pathor1_jax.data.demo import demo_dir, tile_class

PAGE_W, PAGE_H = 595.0, 842.0  # A4 in points
MARGIN = 56.0
BODY_FONT, BODY_SIZE, LEADING = "Times-Roman", 10.5, 13.5
CAPTION_FONT, CAPTION_SIZE, CAPTION_LEADING = "Helvetica", 8.5, 11.0
PX_PER_PT = 2.0  # raster resolution of the figures
SCAN_ROTATION_DEG = 0.7

HEADER = "Chapter 13  Colon and skin: a practical atlas"

PAGE1_BEFORE = [
    "The normal colonic mucosa is built from straight, evenly spaced crypts that rest on a thin muscularis mucosae.",  # noqa: E501
    "Immunohistochemistry for FHL2 highlights the crypt epithelium with a brown DAB chromogen (Fig. 13.1A).",
    "The lamina propria between the crypts contains plasma cells, lymphocytes and a few eosinophils.",
]
PAGE1_AFTER = [
    "At high power the staining is cytoplasmic and strongest near the luminal surface (Fig. 13.1B).",
    "The hematoxylin counterstain marks the nuclei blue, which makes the basal polarity of the cells easy to judge.",  # noqa: E501
    "Loss of this regular pattern is an early clue to dysplasia and should prompt a careful search at higher power.",  # noqa: E501
    "Both panels of Fig. 13.1 come from the same section and were photographed with the same exposure.",
]
PAGE2_LEFT = [
    "The skin is made of an epidermis and a dermis that differ sharply in their staining.",
    "In sections stained with hematoxylin and eosin the epidermis appears as a purple band of keratinocytes.",
]
PAGE2_LEFT_AFTER = [
    "The basal layer lies on a thin basement membrane that is not resolved at this magnification.",
]
PAGE2_RIGHT = [
    "The keratinocytes mature as they move towards the surface, as shown in Figure 13.2A.",
    "Below them the dermis is a loose network of pink collagen bundles (Fig. 13.2B).",
    "Adnexal structures such as hair follicles and sweat glands sit in the deeper dermis.",
    "The colonic crypts of Fig. 13.1 show, by comparison, a single layer of columnar cells.",
    "Inflammation of the dermis is recognised by the number and type of cells around the small vessels.",
    "A regular epidermis and dermis together make the normal baseline for every skin biopsy.",
]
PAGE3_BEFORE = [
    "Tumour tissue replaces the normal architecture with sheets of crowded cells (Fig. 13.3A).",
    "The nuclei are enlarged and hyperchromatic (Fig. 13.3B), and mitoses are frequent.",
    "Necrosis and stromal reaction vary from field to field (Figs. 13.3C and D).",
]
PAGE3_AFTER = [
    "A single field at low power, as in Figure 13.4, is rarely enough for a diagnosis.",
    "The epidermis of Fig. 13.2 offers a useful contrast with the disordered growth of a tumour.",
]

FIGURES: dict[str, dict[str, Any]] = {
    "13.1": {
        "caption": "Fig. 13.1 Colonic mucosa, FHL2 immunostain. A Low-power view of colonic crypts lined by "
        "epithelium with brown DAB staining. B High-power view of the glandular epithelium with a blue "
        "hematoxylin counterstain (×400).",
        "lead": "Colonic mucosa, FHL2 immunostain.",
        "panels": {
            "A": "Low-power view of colonic crypts lined by epithelium with brown DAB staining.",
            "B": "High-power view of the glandular epithelium with a blue hematoxylin counterstain (×400).",
        },
        "source": "ihc_colon",
    },
    "13.2": {
        "caption": "Figure 13.2 Normal skin, H&E. (A) Epidermis with maturing keratinocytes. (B) Dermis with pink "  # noqa: E501
        "collagen bundles.",
        "lead": "Normal skin, H&E.",
        "panels": {"A": "Epidermis with maturing keratinocytes.", "B": "Dermis with pink collagen bundles."},
        "source": "he_skin",
    },
    "13.3": {
        "caption": "Fig. 13.3 Carcinoma, H&E. A Sheets of crowded tumour cells. B Enlarged hyperchromatic nuclei. "  # noqa: E501
        "C Necrotic debris. D Desmoplastic stroma.",
        "lead": "Carcinoma, H&E.",
        "panels": {
            "A": "Sheets of crowded tumour cells.",
            "B": "Enlarged hyperchromatic nuclei.",
            "C": "Necrotic debris.",
            "D": "Desmoplastic stroma.",
        },
        "source": "he_tumour",
    },
    "13.4": {
        "caption": "Fig. 13.4 Tumour region at low power, H&E, with crowded nuclei in pink stroma.",
        "lead": "Tumour region at low power, H&E, with crowded nuclei in pink stroma.",
        "panels": {},
        "source": "he_tumour",
    },
}


def _dense_tiles() -> dict[str, list[str]]:
    """Training tile paths per source, fullest first (fewest near-white pixels): a panel without white
    gaps, which a gutter finder could take for a cut."""
    scored: dict[str, list[tuple[float, str]]] = {}
    with open(os.path.join(demo_dir(), "caption_train.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            path = os.path.join(demo_dir(), rec["image"])
            with Image.open(path) as im:
                white = float((np.asarray(im.convert("RGB")).min(axis=-1) > 200).mean())
            scored.setdefault(tile_class(rec["id"]), []).append((white, path))
    return {k: [p for _, p in sorted(v)] for k, v in scored.items()}


def _panel(tile: str, size: int, letter: str | None) -> Image.Image:
    img = Image.open(tile).convert("RGB").resize((size, size), Image.BICUBIC)
    if letter:
        draw = ImageDraw.Draw(img)
        box = max(24, size // 9)
        draw.rectangle([6, 6, 6 + box, 6 + box], fill="white")
        font = ImageFont.load_default(size=int(box * 0.8))
        l, t, r, b = draw.textbbox((0, 0), letter, font=font)
        draw.text((6 + (box - (r - l)) / 2 - l, 6 + (box - (b - t)) / 2 - t), letter, fill="black", font=font)
    return img


def _wrap(text: str, font: str, size: float, width: float) -> list[str]:
    from reportlab.pdfbase.pdfmetrics import stringWidth

    lines, current = [], ""
    for word in text.split():
        trial = f"{current} {word}".strip()
        if current and stringWidth(trial, font, size) > width:
            lines.append(current)
            current = word
        else:
            current = trial
    return lines + ([current] if current else [])


class _Page:
    """A reportlab page with a top-left coordinate system and a cursor per column."""

    def __init__(self, canvas: Any, number: int):
        self.c = canvas
        self.number = number
        canvas.setFont("Helvetica", 8)
        canvas.drawString(MARGIN, PAGE_H - 36, HEADER)
        canvas.drawCentredString(PAGE_W / 2, 30, str(210 + number))

    def text(self, lines: list[str], x: float, top: float, font: str, size: float, leading: float) -> float:
        self.c.setFont(font, size)
        for i, line in enumerate(lines):
            self.c.drawString(x, PAGE_H - (top + size + i * leading), line)
        return top + len(lines) * leading

    def paragraph(self, sentences: list[str], x: float, top: float, width: float) -> float:
        lines = _wrap(" ".join(sentences), BODY_FONT, BODY_SIZE, width)
        return self.text(lines, x, top, BODY_FONT, BODY_SIZE, LEADING) + LEADING

    def image(self, img: Image.Image, x: float, top: float, width: float) -> list[float]:
        from reportlab.lib.utils import ImageReader

        height = width * img.height / img.width
        self.c.drawImage(ImageReader(img), x, PAGE_H - top - height, width, height)
        return [x, top, x + width, top + height]

    def caption(self, text: str, x: float, top: float, width: float) -> tuple[float, list[float]]:
        lines = _wrap(text, CAPTION_FONT, CAPTION_SIZE, width)
        bottom = self.text(lines, x, top, CAPTION_FONT, CAPTION_SIZE, CAPTION_LEADING)
        return bottom + 1.6 * LEADING, [x, top, x + width, bottom]


def _sub(box: list[float], frac: tuple[float, float, float, float]) -> list[float]:
    x0, t0, x1, b0 = box
    w, h = x1 - x0, b0 - t0
    return [
        round(x0 + frac[0] * w, 2),
        round(t0 + frac[1] * h, 2),
        round(x0 + frac[2] * w, 2),
        round(t0 + frac[3] * h, 2),
    ]


def _figure_truth(
    label: str, bbox: list[float], caption_box: list[float], panels: dict[str, list[float]]
) -> dict:
    spec = FIGURES[label]
    return {
        "figure": label,
        "bbox": [round(v, 2) for v in bbox],
        "caption_bbox": [round(v, 2) for v in caption_box],
        "caption": spec["caption"],
        "lead": spec["lead"],
        "panels": [{"letter": k, "bbox": v, "text": spec["panels"][k]} for k, v in panels.items()],
    }


def _body_pages() -> list[list[str]]:
    return [
        PAGE1_BEFORE + PAGE1_AFTER,
        PAGE2_LEFT + PAGE2_LEFT_AFTER + PAGE2_RIGHT,
        PAGE3_BEFORE + PAGE3_AFTER,
    ]


def make_book(out_dir: str, scan_dpi: int = 200, seed: int = 0) -> dict[str, Any]:
    """Write book.pdf, book_scanned.pdf and truth.json into `out_dir`; return the truth."""
    from reportlab.pdfgen.canvas import Canvas

    os.makedirs(out_dir, exist_ok=True)
    tiles = _dense_tiles()
    pdf_path = os.path.join(out_dir, "book.pdf")
    c = Canvas(pdf_path, pagesize=(PAGE_W, PAGE_H), invariant=1)
    c.setTitle("pathor1_jax demo atlas")
    width = PAGE_W - 2 * MARGIN
    pages: list[list[dict]] = []

    # Page 1: one column, two separate panel images side by side.
    p = _Page(c, 1)
    c.setFont("Helvetica-Bold", 14)
    c.drawString(MARGIN, PAGE_H - 80, "13.1 The colonic mucosa")
    top = p.paragraph(PAGE1_BEFORE, MARGIN, 96, width)
    side, gap = 200.0, 16.0
    x0 = MARGIN + (width - 2 * side - gap) / 2
    size = int(side * PX_PER_PT)
    box_a = p.image(_panel(tiles["ihc_colon"][0], size, "A"), x0, top, side)
    box_b = p.image(_panel(tiles["ihc_colon"][5], size, "B"), x0 + side + gap, top, side)
    top, cap_box = p.caption(FIGURES["13.1"]["caption"], MARGIN, box_a[3] + 8, width)
    p.paragraph(PAGE1_AFTER, MARGIN, top, width)
    fig_box = [box_a[0], box_a[1], box_b[2], box_b[3]]
    pages.append([_figure_truth("13.1", fig_box, cap_box, {"A": box_a, "B": box_b})])
    c.showPage()

    # Page 2: two columns; a composite with a white gutter in the left column.
    p = _Page(c, 2)
    col_w, col_gap = (width - 20) / 2, 20.0
    left, right = MARGIN, MARGIN + col_w + col_gap
    top = p.paragraph(PAGE2_LEFT, left, 70, col_w)
    psize, gutter = 300, 16
    comp = Image.new("RGB", (2 * psize + gutter, psize), "white")
    comp.paste(_panel(tiles["he_skin"][0], psize, "A"), (0, 0))
    comp.paste(_panel(tiles["he_skin"][7], psize, "B"), (psize + gutter, 0))
    box = p.image(comp, left, top, col_w)
    fa, fb = psize / comp.width, (psize + gutter) / comp.width
    panels = {"A": _sub(box, (0, 0, fa, 1)), "B": _sub(box, (fb, 0, 1, 1))}
    top, cap_box = p.caption(FIGURES["13.2"]["caption"], left, box[3] + 8, col_w)
    p.paragraph(PAGE2_LEFT_AFTER, left, top, col_w)
    p.paragraph(PAGE2_RIGHT, right, 70, col_w)
    pages.append([_figure_truth("13.2", box, cap_box, panels)])
    c.showPage()

    # Page 3: a 2x2 grid with black separator lines, then a single-panel figure.
    p = _Page(c, 3)
    top = p.paragraph(PAGE3_BEFORE, MARGIN, 70, width)
    gsize, line = 260, 6
    grid = Image.new("RGB", (2 * gsize + line, 2 * gsize + line), "black")
    for i, letter in enumerate("ABCD"):
        grid.paste(
            _panel(tiles["he_tumour"][3 + i], gsize, letter),
            ((i % 2) * (gsize + line), (i // 2) * (gsize + line)),
        )
    gw = 280.0
    box = p.image(grid, MARGIN + (width - gw) / 2, top, gw)
    f0, f1 = gsize / grid.width, (gsize + line) / grid.width
    panels = {
        "A": _sub(box, (0, 0, f0, f0)),
        "B": _sub(box, (f1, 0, 1, f0)),
        "C": _sub(box, (0, f1, f0, 1)),
        "D": _sub(box, (f1, f1, 1, 1)),
    }
    top, cap_box = p.caption(FIGURES["13.3"]["caption"], MARGIN, box[3] + 8, width)
    truth3 = [_figure_truth("13.3", box, cap_box, panels)]
    sw = 150.0
    box = p.image(
        _panel(tiles["he_tumour"][9], int(sw * PX_PER_PT), None), MARGIN + (width - sw) / 2, top, sw
    )
    top, cap_box = p.caption(FIGURES["13.4"]["caption"], MARGIN, box[3] + 8, width)
    p.paragraph(PAGE3_AFTER, MARGIN, top, width)
    truth3.append(_figure_truth("13.4", box, cap_box, {}))
    pages.append(truth3)
    c.showPage()
    c.save()

    body = _body_pages()
    for i, figs in enumerate(pages):
        window = [s for j in (i - 1, i, i + 1) if 0 <= j < len(body) for s in body[j]]
        for fig in figs:
            fig["inline_refs"] = _truth_refs(window, fig["figure"], [p["letter"] for p in fig["panels"]])
    truth = {"book.pdf": [{"page": i + 1, "figures": figs} for i, figs in enumerate(pages)]}
    scanned = _scan(pdf_path, os.path.join(out_dir, "book_scanned.pdf"), pages[0], scan_dpi, seed)
    for fig in scanned:  # a one-page document: only page 1's sentences can cite its figure
        fig["inline_refs"] = _truth_refs(body[0], fig["figure"], [p["letter"] for p in fig["panels"]])
    truth["book_scanned.pdf"] = [{"page": 1, "figures": scanned}]
    with open(os.path.join(out_dir, "truth.json"), "w") as f:
        json.dump(truth, f, indent=1, ensure_ascii=False)
    return truth


def _truth_refs(window: list[str], label: str, letters: list[str]) -> dict[str, list[str]]:
    """The sentences of the page window citing `label`, for the whole figure ("") and each letter."""
    from .captions import inline_references

    out = {"": inline_references(window, label, None)}
    for letter in letters:
        out[letter] = inline_references(window, label, letter)
    return out


def _rotate_box(box: list[float], angle_deg: float) -> list[float]:
    """The axis-aligned box of `box` rotated (counter-clockwise, as PIL) about the page centre."""
    a = math.radians(angle_deg)
    cx, cy = PAGE_W / 2, PAGE_H / 2
    xs, ys = [], []
    for x, y in ((box[0], box[1]), (box[2], box[1]), (box[0], box[3]), (box[2], box[3])):
        dx, dy = x - cx, y - cy  # y down: a counter-clockwise turn on screen
        xs.append(cx + dx * math.cos(a) + dy * math.sin(a))
        ys.append(cy - dx * math.sin(a) + dy * math.cos(a))
    return [round(min(xs), 2), round(min(ys), 2), round(max(xs), 2), round(max(ys), 2)]


def _scan(pdf_path: str, out_path: str, figures: list[dict], dpi: int, seed: int) -> list[dict]:
    """Page 1 as a scanner would give it: rendered, rotated, noisy, JPEG, image-only PDF."""
    import io

    import pypdfium2 as pdfium
    from reportlab.lib.utils import ImageReader
    from reportlab.pdfgen.canvas import Canvas

    doc = pdfium.PdfDocument(pdf_path)
    img = doc[0].render(scale=dpi / 72).to_pil().convert("RGB")
    doc.close()
    img = img.rotate(SCAN_ROTATION_DEG, resample=Image.BICUBIC, fillcolor="white")
    rng = np.random.default_rng(seed)
    arr = np.asarray(img).astype(np.float32) + rng.normal(0, 6, size=(img.height, img.width, 1))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=80)
    c = Canvas(out_path, pagesize=(PAGE_W, PAGE_H), invariant=1)
    c.drawImage(ImageReader(io.BytesIO(buf.getvalue())), 0, 0, PAGE_W, PAGE_H)
    c.showPage()
    c.save()
    out = []
    for fig in figures:
        fig = json.loads(json.dumps(fig))
        fig["bbox"] = _rotate_box(fig["bbox"], SCAN_ROTATION_DEG)
        fig["caption_bbox"] = _rotate_box(fig["caption_bbox"], SCAN_ROTATION_DEG)
        for panel in fig["panels"]:
            panel["bbox"] = _rotate_box(panel["bbox"], SCAN_ROTATION_DEG)
        out.append(fig)
    return out

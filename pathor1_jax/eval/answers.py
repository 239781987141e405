"""Final answers out of free-text responses: an MCQ's option letter, a yes/no (pure functions).

The rules re-implement VLMEvalKit's exact matching (`can_infer_option`, `can_infer_text`,
`YOrN_Extraction`), preceded by Patho-R1's `<answer>` tag, and with one change: what no rule can
read is unparsable (None) and counts as wrong — VLMEvalKit falls back to a random option. An LLM
judge may resolve unparsable responses (`pathor1 eval vlm --judge-url`); those are counted
separately.

**Texts tried, in order** (`candidate_texts`): (1) the content of the last complete
`<answer>…</answer>` block that does not lie inside a `<think>` block, when there is one; (2) the
response without its reasoning: everything up to the last `</think>` removed, then anything from
an unclosed `<think>` on (a response cut off while thinking has no answer). The first text a rule
reads decides; a refusal in a text decides None.

**Refusal** (either extractor): the text contains one of `REFUSALS` (case-insensitive), e.g.
"cannot determine the answer", "I'm sorry, but" → None.

**`extract_option(response, options)`**, in each text:
1. *letter*: the characters `.()[],:;!*#{}` become spaces and the text is split on whitespace;
   exactly one of the option letters occurs as a whole token (letters are upper-case: "a" is an
   article), and it is among the last `LAST_TOKENS` (5) tokens → that letter. ("A biopsy shows
   B" names two letters: no.)
2. *"answer is X"*: `(correct) answer is X` with the words in any case, X an option letter in upper
   case, optionally in `**bold**`, not followed by a letter or digit → X.
3. *option text*: the text is at most twice as long as all the options' texts together and
   contains (case-insensitively) the text of exactly one option → that option.

**`extract_yes_no(response)`**, in each text: lower-cased, punctuation → spaces, split into words;
"yes" is a word and "no" is not → "yes"; the reverse → "no"; both or neither → not read.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping

REFUSALS: tuple[str, ...] = (  # VLMEvalKit's list (lower-cased) and ours
    "sorry, i can't help with images of people yet",
    "i can't process this file",
    "i'm sorry, but without the image provided",
    "cannot determine the answer",
    "can't determine the answer",
    "unable to determine the answer",
    "cannot answer this question",
    "can't answer this question",
    "unable to answer this question",
    "i'm sorry, but",
    "i am sorry, but",
    "none of the options",
    "none of the above",
)
LAST_TOKENS = 5
_OPTION_PUNCTUATION = str.maketrans({c: " " for c in ".()[],:;!*#{}"})
_WORD_PUNCTUATION = str.maketrans({c: " " for c in string.punctuation})
_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_ANSWER_IS = re.compile(r"(?i:(?:correct\s+)?answer\s+is)\s+\**([A-Z])\**(?![A-Za-z0-9])")


def strip_reasoning(response: str) -> str:
    """The response without `<think>` reasoning: text up to the last `</think>` is dropped, and an
    unclosed `<think>` drops the rest."""
    _, closed, after = response.rpartition("</think>")
    text = after if closed else response
    return text.split("<think>", 1)[0] if "<think>" in text else text


def answer_block(response: str) -> str | None:
    """The stripped content of the last complete `<answer>` block outside `<think>` blocks, or None."""
    for match in reversed(list(_ANSWER_BLOCK.finditer(response))):
        before = response[: match.start()]
        if before.count("<think>") <= before.count("</think>"):
            return match.group(1).strip()
    return None


def candidate_texts(response: str) -> list[str]:
    """The texts the extractors read, in order (see the module docstring)."""
    block = answer_block(response)
    rest = strip_reasoning(response).strip()
    return [t for t in (block, rest) if t is not None]


def is_refusal(text: str) -> bool:
    lowered = text.lower().replace("’", "'")
    return any(phrase in lowered for phrase in REFUSALS)


def _letter_token(text: str, letters: Mapping[str, str]) -> str | None:
    tokens = text.translate(_OPTION_PUNCTUATION).split()
    named = [letter for letter in letters if letter in tokens]
    if len(named) != 1:
        return None
    last = max(i for i, token in enumerate(tokens) if token == named[0])
    return named[0] if last >= len(tokens) - LAST_TOKENS else None


def _answer_is(text: str, letters: Mapping[str, str]) -> str | None:
    match = _ANSWER_IS.search(text)
    return match.group(1) if match and match.group(1) in letters else None


def _option_text(text: str, options: Mapping[str, str]) -> str | None:
    lowered = text.lower()
    if len(lowered) > 2 * sum(len(v) for v in options.values()):
        return None
    hits = [letter for letter, value in options.items() if value.strip() and value.strip().lower() in lowered]
    return hits[0] if len(hits) == 1 else None


def extract_option(response: str, options: Mapping[str, str]) -> str | None:
    """The option letter a response chooses among `options` (letter → text), or None when no rule
    reads one or the response refuses (module docstring)."""
    for text in candidate_texts(response):
        if is_refusal(text):
            return None
        for rule in (_letter_token, _answer_is, _option_text):
            found = rule(text, options)
            if found is not None:
                return found
    return None


def extract_yes_no(response: str) -> str | None:
    """The answer "yes" or "no", or None when the response does not say, says both, or refuses."""
    for text in candidate_texts(response):
        if is_refusal(text):
            return None
        words = set(text.lower().translate(_WORD_PUNCTUATION).split())
        if ("yes" in words) != ("no" in words):
            return "yes" if "yes" in words else "no"
    return None

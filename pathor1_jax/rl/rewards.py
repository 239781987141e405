"""The rule-based rewards of Patho-R1 (paper section 3.4, Eqs. 3 and 4), as pure host-side functions.

A response is the decoded completion only (no prompt, cut at EOS). The expected layout is the
R1 template `<think>reasoning</think><answer>X</answer>` with X one option letter from A–F.

Rules, stated once here and applied by every function below:
- Tags are matched literally and case-sensitively (`<think>`, `</think>`, `<answer>`, `</answer>`).
- Whitespace means `str.isspace` characters (spaces, tabs, newlines).
- An answer letter is accepted only as the whole content of the `<answer>` block once surrounding
  whitespace is stripped: `" B\\n"` counts as B; `"B."`, `"(B)"`, `"b"`, `"B) adenoma"`, `"B C"`,
  `"G"` and `""` do not ("only exact matches to a valid option from {A, …, F} are accepted").
"""

from __future__ import annotations

import re

OPTION_LETTERS = frozenset("ABCDEF")

_FORMAT = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def _check_answer_label(answer: str) -> str:
    if answer not in OPTION_LETTERS:
        raise ValueError(f"ground-truth answer must be one option letter from A–F, got {answer!r}")
    return answer


def format_reward(text: str) -> float:
    """R_fmt: 1.0 iff the response is `<think>…</think>` then `<answer>…</answer>` and nothing else.

    Each of the four tags must occur exactly once (so nested or repeated blocks, and an `<answer>`
    inside `<think>`, score 0), the think block must come first, and only whitespace may lie before,
    between or after the two blocks. The contents of the blocks are not checked here.
    """
    if any(text.count(tag) != 1 for tag in _TAGS):
        return 0.0
    return 1.0 if _FORMAT.fullmatch(text) else 0.0


def extract_answer(text: str) -> str | None:
    """The stripped content of the response's single `<answer>` block, or None.

    None when `<answer>` or `</answer>` does not occur exactly once, when they are out of order, or
    when the block lies inside the `<think>…</think>` span (an answer drafted while reasoning is not
    the final answer).
    """
    if text.count("<answer>") != 1 or text.count("</answer>") != 1:
        return None
    start, end = text.index("<answer>"), text.index("</answer>")
    if end < start:
        return None
    think_start, think_end = text.find("<think>"), text.find("</think>")
    if think_start != -1 and think_start < start and (think_end == -1 or think_end > start):
        return None
    return text[start + len("<answer>") : end].strip()


def accuracy_reward(text: str, answer: str) -> float:
    """R_acc: 1.0 iff the single `<answer>` block holds exactly the ground-truth option letter.

    `answer` is the ground truth, one uppercase letter from A–F (ValueError otherwise). The block's
    content is compared after stripping surrounding whitespace only; see the module docstring for what
    is rejected (punctuation, parentheses, lowercase, extra text, letters outside A–F, empty).
    """
    _check_answer_label(answer)
    predicted = extract_answer(text)
    return 1.0 if predicted is not None and predicted in OPTION_LETTERS and predicted == answer else 0.0


def length_score(num_tokens: int, l_max: int, l_cache: int) -> float:
    """DAPO's soft overlong punishment of a response of `num_tokens` tokens, in [−1, 0].

    0 when L ≤ L_max − L_cache; ((L_max − L_cache) − L) / L_cache inside the cache zone
    L_max − L_cache < L ≤ L_max (falling linearly to −1 at L_max); −1 when L > L_max.
    """
    if not 0 < l_cache <= l_max:
        raise ValueError(f"need 0 < l_cache <= l_max, got l_cache={l_cache}, l_max={l_max}")
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    expected_max = l_max - l_cache
    if num_tokens <= expected_max:
        return 0.0
    if num_tokens <= l_max:
        return (expected_max - num_tokens) / l_cache
    return -1.0


def grpo_reward(text: str, answer: str) -> float:
    """Eq. 3: 0.1·R_fmt + 0.9·R_acc if R_fmt = 1 and R_acc = 1, else 0 (so 1.0 or 0.0)."""
    r_fmt, r_acc = format_reward(text), accuracy_reward(text, answer)
    return 0.1 * r_fmt + 0.9 * r_acc if r_fmt == 1.0 and r_acc == 1.0 else 0.0


def dapo_reward(
    text: str, answer: str, num_tokens: int, l_max: int, l_cache: int, variant: str = "paper"
) -> float:
    """Eq. 4 with R_len = 1 + `length_score` ∈ [0, 1] (1 below the cache zone, 0 at and past L_max).

    variant="paper" (Eq. 4 literally): 0.5·R_acc + 0.5·R_len if R_acc = 1 and R_len = 1, else −1.
        R_len = 1 only for L ≤ L_max − L_cache, so the reward is binary: 1.0 for a correct answer
        below the cache zone, −1.0 for anything else (wrong, or correct but inside the cache zone).
    variant="soft": 0.5 + 0.5·R_len if R_acc = 1, else −1. A correct answer earns 1.0 below the
        cache zone, decays linearly to 0.5 at L_max and stays 0.5 past it; a wrong one earns −1.
    Neither variant looks at R_fmt (Eq. 4 does not), though R_acc needs the `<answer>` block.
    """
    r_acc = accuracy_reward(text, answer)
    r_len = 1.0 + length_score(num_tokens, l_max, l_cache)
    if variant == "paper":
        return 0.5 * r_acc + 0.5 * r_len if r_acc == 1.0 and r_len == 1.0 else -1.0
    if variant == "soft":
        return 0.5 + 0.5 * r_len if r_acc == 1.0 else -1.0
    raise ValueError(f"dapo_reward variant must be 'paper' or 'soft', got {variant!r}")

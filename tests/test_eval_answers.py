"""Answer extraction rules (`pathor1_jax.eval.answers`) on hand-written responses, one case per rule."""

import pytest

from pathor1_jax.eval.answers import (
    answer_block,
    candidate_texts,
    extract_option,
    extract_yes_no,
    strip_reasoning,
)

OPTIONS = {"A": "Adenocarcinoma", "B": "Squamous cell carcinoma", "C": "Lymphoma", "D": "Melanoma"}


@pytest.mark.parametrize(
    "response, expected",
    [
        # the <answer> tag first
        ("<think>Glands, mucin: A or B?</think><answer>A</answer>", "A"),
        ("<think>keratin pearls</think><answer> B. Squamous cell carcinoma </answer>", "B"),
        ("<think>x</think><answer>(C)</answer>", "C"),
        ("<think>x</think><answer>**D**</answer>", "D"),
        ("<answer>B</answer> wait <answer>C</answer>", "C"),  # the last block
        ("<think>draft <answer>A</answer> no...</think><answer>D</answer>", "D"),  # not the drafted one
        ("<think>Melanin pigment.</think><answer>Melanoma</answer>", "D"),  # option text inside the tag
        # tag present but unreadable: the text outside the reasoning decides
        ("<think>x</think><answer></answer> The answer is C.", "C"),
        # VLMEvalKit's letter rule: exactly one letter token among the last 5 tokens
        ("B", "B"),
        ("B.", "B"),
        ("(C) Lymphoma", "C"),
        ("Answer: D", "D"),
        ("Looking at the cells, the best choice is C", "C"),
        ("Option B fits, as the nuclei are large, atypical and hyperchromatic", None),  # B not in the last 5
        ("The nuclei are large and atypical, consistent with option B here", "B"),  # 2nd of the last 5
        ("A biopsy shows B", None),  # two letters named (A as an article): not read by the letter rule
        ("A or B", None),
        # "the answer is X"
        ("The answer is B because keratin pearls and intercellular bridges are present in this tumour.", "B"),
        ("The correct answer is **C**, given the sheets of atypical lymphoid cells seen on the slide.", "C"),
        ("the answer is a benign lesion", None),  # lower-case "a" is an article, not option A
        ("The answer is E.", None),  # E is not an option
        # option text, exactly one, in a short text
        ("It is a lymphoma.", "C"),
        ("squamous cell carcinoma", "B"),
        ("Either adenocarcinoma or melanoma.", None),  # two option texts
        # refusals
        ("I'm sorry, but I cannot provide a diagnosis. A", None),
        ("Cannot determine the answer from this image.", None),
        ("<think>hmm</think><answer>None of the options</answer>", None),
        # reasoning only (cut off while thinking): no answer
        ("<think>Option A seems likely because", None),
        ("", None),
        # reasoning before an unopened </think> is dropped
        ("Considering A and B and C...</think><answer>B</answer>", "B"),
        # Chinese response with the tag
        ("<think>腺体结构</think><answer>A</answer>", "A"),
    ],
)
def test_extract_option(response, expected):
    assert extract_option(response, OPTIONS) == expected


def test_substring_option_text_needs_exactly_one_match():
    # "Carcinoma" occurs in B's text, but the rule asks for an option's text inside the response
    assert extract_option("Carcinoma", OPTIONS) is None
    assert extract_option("Squamous cell carcinoma, well differentiated", OPTIONS) == "B"


def test_options_with_six_letters_and_long_texts():
    options = {letter: f"choice {letter.lower()}{letter.lower()}" for letter in "ABCDEF"}
    assert extract_option("I pick F", options) == "F"
    assert extract_option("choice ee", options) == "E"


@pytest.mark.parametrize(
    "response, expected",
    [
        ("<think>No atypia is seen... but wait</think><answer>Yes</answer>", "yes"),
        ("<think>x</think><answer>no.</answer>", "no"),
        ("Yes, this is an IHC stain.", "yes"),
        ("No", "no"),
        ("NO!", "no"),
        ("Yes and no.", None),  # both
        ("Possibly.", None),  # neither
        ("There is no necrosis. Yes.", None),  # both words in one text
        ("<think>yes? no?</think><answer>maybe</answer> Yes", "yes"),  # tag unreadable, text after it
        ("<think>I think yes", None),  # cut off while thinking
        ("I'm sorry, but I can't tell. No", None),  # refusal
        ("Nope", None),  # not the word "no"
        ("yes-ish", "yes"),  # punctuation splits words (VLMEvalKit's rule)
    ],
)
def test_extract_yes_no(response, expected):
    assert extract_yes_no(response) == expected


def test_reasoning_helpers():
    assert strip_reasoning("<think>a</think>b") == "b"
    assert strip_reasoning("a</think>b</think>c") == "c"
    assert strip_reasoning("x <think>y") == "x "
    assert answer_block("<answer> A </answer>") == "A"
    assert answer_block("<think><answer>A</answer>") is None
    assert candidate_texts("<think>r</think><answer>B</answer>") == ["B", "<answer>B</answer>"]

"""The paper's rewards (Eqs. 3, 4) on hand-written responses, adversarial ones included."""

import pytest

from pathor1_jax.rl.rewards import (
    accuracy_reward,
    dapo_reward,
    extract_answer,
    format_reward,
    grpo_reward,
    length_score,
)

GOOD = "<think>Glands with nuclear atypia.</think><answer>B</answer>"

# (response, R_fmt, R_acc against ground truth "B")
CASES = [
    (GOOD, 1.0, 1.0),
    ("\n  <think>\nreasoning\n</think>\n\n<answer> B \n</answer>\n", 1.0, 1.0),
    ("<think>r</think><answer>C</answer>", 1.0, 0.0),  # well formed, wrong letter
    ("<think>r</think><answer>B</answer><answer>B</answer>", 0.0, 0.0),  # two answer blocks
    ("<think>r</think><answer>A</answer><answer>B</answer>", 0.0, 0.0),
    ("So: <think>r</think><answer>B</answer>", 0.0, 1.0),  # text before the tags
    ("<think>r</think>so<answer>B</answer>", 0.0, 1.0),  # text between the tags
    ("<think>r</think><answer>B</answer> Final answer: B", 0.0, 1.0),  # text after the tags
    ("<think>r<think>s</think></think><answer>B</answer>", 0.0, 1.0),  # nested think
    ("<think>r</think><answer><answer>B</answer></answer>", 0.0, 0.0),  # nested answer
    ("<think>r</think><answer>b</answer>", 1.0, 0.0),  # lowercase letter
    ("<think>r</think><answer>B.</answer>", 1.0, 0.0),
    ("<think>r</think><answer>(B)</answer>", 1.0, 0.0),
    ("<think>r</think><answer>B. Adenocarcinoma</answer>", 1.0, 0.0),
    ("<think>r</think><answer>G</answer>", 1.0, 0.0),  # letter outside A–F
    ("<think>r</think><answer></answer>", 1.0, 0.0),  # empty answer
    ("<think>r</think><answer>  </answer>", 1.0, 0.0),
    ("<think>r <answer>B</answer></think>", 0.0, 0.0),  # the only answer is inside think
    ("<think>r <answer>B</answer></think><answer>B</answer>", 0.0, 0.0),  # answer inside think + outside
    ("<answer>B</answer><think>r</think>", 0.0, 1.0),  # blocks in the wrong order
    ("<answer>B</answer>", 0.0, 1.0),  # no think block
    ("<think>r</think>", 0.0, 0.0),  # no answer block
    ("<think>r</think><answer>B", 0.0, 0.0),  # unclosed answer
    ("<think>r</think></answer>B<answer>", 0.0, 0.0),  # tags out of order
    ("<THINK>r</THINK><ANSWER>B</ANSWER>", 0.0, 0.0),  # tags are case-sensitive
    ("B", 0.0, 0.0),
    ("", 0.0, 0.0),
]


@pytest.mark.parametrize("text,r_fmt,r_acc", CASES)
def test_format_and_accuracy_rewards(text, r_fmt, r_acc):
    assert format_reward(text) == r_fmt
    assert accuracy_reward(text, "B") == r_acc


@pytest.mark.parametrize("text,r_fmt,r_acc", CASES)
def test_grpo_reward_is_eq3(text, r_fmt, r_acc):
    expected = 0.1 * r_fmt + 0.9 * r_acc if r_fmt == 1 and r_acc == 1 else 0.0
    assert grpo_reward(text, "B") == expected
    assert grpo_reward(text, "B") in (0.0, 1.0)


def test_extract_answer_strips_only_whitespace():
    assert extract_answer("<think>x</think><answer>\t C\n</answer>") == "C"
    assert extract_answer("<think>x</think><answer> (C) </answer>") == "(C)"
    assert extract_answer("<think>x <answer>C</answer></think>") is None
    assert extract_answer("<think>x</think><answer>C</answer><answer>D</answer>") is None


def test_accuracy_reward_rejects_a_bad_ground_truth():
    with pytest.raises(ValueError, match="ground-truth answer"):
        accuracy_reward(GOOD, "b")
    with pytest.raises(ValueError, match="ground-truth answer"):
        accuracy_reward(GOOD, "G")


@pytest.mark.parametrize(
    "num_tokens,expected",
    [(0, 0.0), (60, 0.0), (61, -0.05), (70, -0.5), (79, -0.95), (80, -1.0), (81, -1.0), (1000, -1.0)],
)
def test_length_score_is_dapo_soft_overlong_punishment(num_tokens, expected):
    # L_max = 80, L_cache = 20: free up to 60 tokens, linear to −1 at 80, −1 beyond.
    assert length_score(num_tokens, 80, 20) == pytest.approx(expected, abs=1e-12)


def test_length_score_rejects_bad_limits():
    with pytest.raises(ValueError, match="l_cache"):
        length_score(10, 80, 0)
    with pytest.raises(ValueError, match="l_cache"):
        length_score(10, 80, 100)
    with pytest.raises(ValueError, match="num_tokens"):
        length_score(-1, 80, 20)


@pytest.mark.parametrize(
    "text,num_tokens,paper,soft",
    [
        (GOOD, 10, 1.0, 1.0),  # correct, below the cache zone
        (GOOD, 60, 1.0, 1.0),  # correct, at the edge of the cache zone
        (GOOD, 70, -1.0, 0.75),  # correct inside the cache zone: R_len = 0.5
        (GOOD, 80, -1.0, 0.5),  # correct at L_max: R_len = 0
        (GOOD, 200, -1.0, 0.5),  # correct but overlong
        ("<think>r</think><answer>C</answer>", 10, -1.0, -1.0),  # wrong
        ("<think>r</think><answer>C</answer>", 200, -1.0, -1.0),
        ("<answer>B</answer>", 10, 1.0, 1.0),  # Eq. 4 does not look at the format
        ("<think>r</think><answer>B.</answer>", 10, -1.0, -1.0),
    ],
)
def test_dapo_reward_variants(text, num_tokens, paper, soft):
    assert dapo_reward(text, "B", num_tokens, 80, 20) == pytest.approx(paper)
    assert dapo_reward(text, "B", num_tokens, 80, 20, variant="paper") == pytest.approx(paper)
    assert dapo_reward(text, "B", num_tokens, 80, 20, variant="soft") == pytest.approx(soft)


def test_dapo_reward_rejects_unknown_variant():
    with pytest.raises(ValueError, match="variant"):
        dapo_reward(GOOD, "B", 10, 80, 20, variant="hard")

"""The LLM judge against the scripted OpenAI-compatible server (valid, malformed, timeouts, kill and
resume from the cache), and `pathor1 eval vlm`'s judging and tables on hand-made predictions."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

pytest.importorskip("openai")

from fake_openai import FakeOpenAI, Reply  # noqa: E402

from pathor1_jax.data.llm import LLMClient  # noqa: E402
from pathor1_jax.data.records import MCQRecord, VQARecord  # noqa: E402
from pathor1_jax.eval.judge import CRITERIA, Judge, JudgeError, overall  # noqa: E402
from pathor1_jax.eval.vlm import judge_predictions, prediction  # noqa: E402
from pathor1_jax.eval.vlm_report import build_report, csv_rows, markdown, write_report  # noqa: E402

SCORES = {k: i + 1 for i, k in enumerate(CRITERIA)}  # 1..10


def by_prompt(body: dict) -> Reply:
    """Answers by what the judge asks (deterministic under concurrency)."""
    prompt = body["messages"][1]["content"]
    if "Score each criterion" in prompt:
        return Reply("<think>weighing</think>```json\n" + json.dumps(SCORES) + "\n```")
    if "Reference answer:" in prompt:
        return Reply('{"correct": 1}' if "Reference answer:\nA gland" in prompt else '{"correct": 0}')
    if "Options:" in prompt:
        return Reply('{"option": "b"}')
    return Reply('{"answer": "No"}')


def judge_for(server: FakeOpenAI, tmp_path, **kw) -> Judge:
    client = LLMClient(server.url, "judge-r1", cache=tmp_path / "cache.jsonl", backoff_s=0.01, **kw)
    return Judge(client)


def test_valid_judgments(tmp_path):
    with FakeOpenAI(by_prompt) as server:
        judge = judge_for(server, tmp_path)
        assert judge.final_answer(
            "What is shown?", "A gland", "<think>…</think><answer>glandular tissue</answer>"
        )
        assert not judge.final_answer("What is shown?", "Necrosis", "a gland")
        assert judge.criteria("q", "A gland", "r", reasoning="step 1") == SCORES
        assert judge.criteria("q", "A gland", "r") == SCORES
        assert overall(SCORES) == 5.5
        assert judge.option("Which?", {"A": "x", "B": "y"}, "I'd say the second") == "B"
        assert judge.yes_no("IHC?", "Hard to tell, probably not") == "no"
        asked = [r["messages"][1]["content"] for r in server.requests]
        assert "step 1\nFinal answer: A gland" in asked[2]  # the reference reasoning is shown
        assert "gives the final answer only" in asked[3]  # and said to be missing otherwise
        assert "step 1" not in asked[3]
        assert all(r["temperature"] == 0.0 for r in server.requests)


def test_malformed_replies_are_asked_again_then_fail(tmp_path):
    script = [Reply('Sure: {"correct": 1}'), Reply('{"correct": 1}')]
    with FakeOpenAI(script) as server:
        assert judge_for(server, tmp_path).final_answer("q", "a", "r") is True
        retry = server.requests[1]["messages"]
        assert retry[2] == {"role": "assistant", "content": 'Sure: {"correct": 1}'}
        assert "not valid" in retry[3]["content"]
    bad = {**SCORES, "hallucination": 11}
    with FakeOpenAI([Reply(json.dumps(bad))]) as server:
        judge = judge_for(server, tmp_path / "b")
        with pytest.raises(
            JudgeError, match="no valid JSON after 3 attempt.*'hallucination' must be an integer"
        ):
            judge.criteria("q", "a", "r")
        assert server.count == 3
    with FakeOpenAI([Reply('{"option": "Q"}')]) as server:
        with pytest.raises(JudgeError, match=r"field \"option\" must be one of \['A', 'B', 'Z'\]"):
            judge_for(server, tmp_path / "c").option("q", {"A": "x", "B": "y"}, "r")


def test_timeouts_are_retried_and_failures_reported(tmp_path):
    with FakeOpenAI([Reply(delay_s=2.0), Reply('{"answer": "yes"}')]) as server:
        judge = judge_for(server, tmp_path, timeout_s=0.5, max_retries=1)
        assert judge.yes_no("q", "r") == "yes"
        assert server.count == 2
    with FakeOpenAI([Reply(status=500)]) as server:
        judge = judge_for(server, tmp_path / "b", max_retries=1)
        with pytest.raises(JudgeError, match="question 'x'.*after 2 attempt"):
            judge.yes_no("q", "r", where="question 'x'")


KILLED_RUN = """
import sys
from pathor1_jax.data.llm import LLMClient
from pathor1_jax.eval.judge import Judge
judge = Judge(LLMClient(sys.argv[1], "judge-r1", cache=sys.argv[2], max_concurrency=1))
for i in range(int(sys.argv[3])):
    judge.final_answer(f"question {i}", "A gland", "response")
    print(i, flush=True)
"""


def test_killed_judging_resumes_from_the_cache_without_paying_twice(tmp_path):
    n = 6
    cache = tmp_path / "judge_cache.jsonl"
    with FakeOpenAI(lambda body: Reply('{"correct": 1}', delay_s=0.3)) as server:
        command = [sys.executable, "-c", textwrap.dedent(KILLED_RUN), server.url, str(cache), str(n)]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        for _ in range(3):
            proc.stdout.readline()  # three judgments answered and cached
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        time.sleep(0.4)  # a request in flight at the kill may still reach the server
        paid_before = server.count
        cached = len(cache.read_text().splitlines())
        assert cached >= 3
        judge = Judge(LLMClient(server.url, "judge-r1", cache=cache))
        assert all(judge.final_answer(f"question {i}", "A gland", "response") for i in range(n))
        assert server.count - paid_before == n - cached  # what was answered before is not paid again
        assert judge.client.stats["cache_hits"] == cached


MCQ = [
    MCQRecord("m1", (), "Which stain?", {"A": "H&E", "B": "IHC"}, "B", benchmark="PathMMU", category="Atlas",
              split="val"),
    MCQRecord("m2", (), "Which organ?", {"A": "Colon", "B": "Skin"}, "A", benchmark="PathMMU",
              category="PubMed", split="val"),
    MCQRecord("m3", (), "Which cell?", {"A": "T cell", "B": "B cell"}, "B", benchmark="PathMMU",
              category="PubMed", split="val"),
]  # fmt: skip
VQA = [
    VQARecord("y1", (), "Is this IHC?", "no", "yes_no", benchmark="PathVQA", split="test"),
    VQARecord("y2", (), "Is it malignant?", "yes", "yes_no", benchmark="PathVQA", split="test"),
    VQARecord("o1", (), "What is shown?", "A gland", "open", benchmark="PathVQA", split="test"),
    VQARecord("o2", (), "What is shown?", "Necrosis", "open", benchmark="PathVQA", split="test"),
]
RESPONSES = {
    ("patho_r1", "m1"): "<think>brown</think><answer>B</answer>",  # right, by the tag
    ("patho_r1", "m2"): "<think>crypts</think><answer>B</answer>",  # wrong
    ("patho_r1", "m3"): "It could be either.",  # unparsable: the judge says B (right)
    ("patho_r1", "y1"): "<answer>No.</answer>",  # right
    ("patho_r1", "y2"): "Hmm.",  # unparsable: the judge says no (wrong)
    ("patho_r1", "o1"): "<think>lumen</think><answer>A gland</answer>",
    ("patho_r1", "o2"): "<answer>A gland</answer>",
    ("patho_r1_cod", "m1"): "A",
    ("patho_r1_cod", "m2"): "A",
    ("patho_r1_cod", "m3"): "B",
    ("patho_r1_cod", "y1"): "no",
    ("patho_r1_cod", "y2"): "yes",
    ("patho_r1_cod", "o1"): "a gland",
    ("patho_r1_cod", "o2"): "necrosis",
}


def test_judged_predictions_make_the_papers_tables(tmp_path):
    records = {r.id: r for r in MCQ + VQA}
    predictions = [
        prediction(records[rid], style, (text, 5, "stop")) for (style, rid), text in RESPONSES.items()
    ]
    assert [p["extracted"] for p in predictions[:5]] == ["B", "B", None, "no", None]
    with FakeOpenAI(by_prompt) as server:
        judge = judge_for(server, tmp_path)
        judge_predictions(predictions, records, judge, workers=4, progress=False)
        paid = server.count
        judge_predictions(predictions, records, judge, workers=4, progress=False)
        assert server.count == paid  # nothing left to judge
    report = build_report(predictions)
    cot = next(r for r in report["mcq"] if r["prompt_style"] == "patho_r1")
    assert (cot["n"], cot["accuracy"], cot["accuracy_rules_only"]) == (3, 66.67, 33.33)
    assert (cot["unparsed"], cot["judge_resolved"]) == (0, 1)
    assert cot["categories"] == {
        "Atlas": {
            "n": 1,
            "accuracy": 100.0,
            "accuracy_rules_only": 100.0,
            "unparsed": 0,
            "judge_resolved": 0,
        },
        "PubMed": {"n": 2, "accuracy": 50.0, "accuracy_rules_only": 0.0, "unparsed": 0, "judge_resolved": 1},
    }
    yes_no = {r["prompt_style"]: r for r in report["yes_no"]}
    assert (yes_no["patho_r1"]["accuracy"], yes_no["patho_r1_cod"]["accuracy"]) == (50.0, 100.0)
    (cot_open,) = [r for r in report["open"] if r["prompt_style"] == "patho_r1"]
    assert (cot_open["judged"], cot_open["accuracy"]) == (2, 50.0)  # o1 right, o2 wrong
    assert (
        cot_open["criteria"] == {k: float(v) for k, v in SCORES.items()} and cot_open["steps_percent"] == 55.0
    )
    text = markdown(report)
    assert "### PathMMU · val (3 questions)" in text
    assert "| prompt style | Atlas | PubMed | Overall | rules only | unparsed | judge-resolved |" in text
    assert "| patho_r1 | 100.00 | 50.00 | 66.67 | 33.33 | 0 | 1 |" in text
    assert "| patho_r1_cod | 0.00 | 100.00 | 66.67 | 66.67 | 0 | 0 |" in text
    assert (
        "| prompt style | PathVQA · test (n=2) |\n|---|---|\n| patho_r1 | 50.00 |\n| patho_r1_cod | 100.00 |"
        in text
    )
    rows = csv_rows(report)
    assert {"table": "open", "benchmark": "PathVQA", "split": "test", "prompt_style": "patho_r1_cod",
            "group": "", "metric": "accuracy", "value": 50.0, "n": 2} in rows  # fmt: skip
    write_report(report, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "report.json").read_text())["mcq"][0]["accuracy"] == 66.67
    assert (tmp_path / "out" / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_unparsable_without_a_judge_counts_wrong():
    predictions = [prediction(MCQ[2], "plain", ("It could be either.", 4, "stop"))]
    (row,) = build_report(predictions)["mcq"]
    assert (row["accuracy"], row["unparsed"], row["judge_resolved"]) == (0.0, 1, 0)


class CountingBackend:
    """Answers every question with its id; fails after `fail_after` questions (a crash mid-run)."""

    batch_size = 2

    def __init__(self, fail_after: int | None = None):
        self.asked: list[str] = []
        self.fail_after = fail_after

    def generate(self, chats, max_tokens):
        if self.fail_after is not None and len(self.asked) >= self.fail_after:
            raise RuntimeError("endpoint went away")
        self.asked += [rid for rid, _ in chats]
        return [(f"<answer>{rid}</answer>", 3, "stop") for rid, _ in chats]


def test_generation_resumes_from_the_predictions_file(tmp_path):
    from pathor1_jax.eval.vlm import PREDICTIONS, generate_missing

    records = MCQ + VQA
    styles = ["patho_r1", "patho_r1_cod"]
    first = CountingBackend(fail_after=4)
    with pytest.raises(RuntimeError, match="went away"):
        generate_missing(records, styles, first, tmp_path, max_new_tokens=8, progress=False)
    assert len((tmp_path / PREDICTIONS).read_text().splitlines()) == 4  # two batches were written
    with open(tmp_path / PREDICTIONS, "a") as f:
        f.write('{"id": "torn')  # a write cut by a kill
    second = CountingBackend()
    predictions = generate_missing(records, styles, second, tmp_path, max_new_tokens=8, progress=False)
    assert len(second.asked) == 2 * len(records) - 4  # only what was missing
    assert sorted((p["prompt_style"], p["id"]) for p in predictions) == sorted(
        (s, r.id) for s in styles for r in records
    )
    assert len((tmp_path / PREDICTIONS).read_text().splitlines()) == 2 * len(records)

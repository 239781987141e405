"""generate → qc → sample against the scripted OpenAI-compatible server: valid, malformed,
<think>-prefixed, repetitive and language-mixed replies; kill -9 and rerun resumes from the cache;
QC rules; the RL sampler's strata, disjointness and answer-letter balance on hand-computed cases."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("openai")

from fake_openai import FakeOpenAI, Reply  # noqa: E402

from pathor1_jax.curation import qc  # noqa: E402
from pathor1_jax.curation.generate import templates  # noqa: E402
from pathor1_jax.curation.io import read_jsonl, write_jsonl  # noqa: E402
from pathor1_jax.curation.sample import allocate, largest_remainder, sample_rl  # noqa: E402
from pathor1_jax.curation.steps import LLMSpec, run_generate, run_qc, run_sample  # noqa: E402

MCQ = {
    "question": "What is the most likely diagnosis?",
    "reasoning": "Crowded glands with atypia point to carcinoma.",
    "options": {"A": "Adenocarcinoma", "B": "Normal mucosa", "C": "Lymphoma", "D": "Hyperplastic polyp"},
    "answer": "A",
}
DESC = {
    "question": "Describe the image.",
    "reasoning": "Brown DAB staining marks the cytoplasm of the crypt epithelium in every gland.",
    "answer": "FHL2-positive colonic crypts lined by columnar epithelium.",
}


def test_sixty_templates_cover_the_matrix_and_are_ours():
    t = templates()
    keys = {(x["subfield"], x["level"], x["task"]) for x in t["templates"]}
    assert len(t["templates"]) == len(keys) == 60
    assert {k[0] for k in keys} == {"histopathology", "gross", "IHC", "cytology", "FISH"}
    assert "Ours" in t["_note"] and all(
        "{caption}" in x["user"] and "{inline_refs}" in x["user"] for x in t["templates"]
    )


def pairs_file(tmp_path, n=4):
    img = tmp_path / "img.png"
    from PIL import Image

    Image.new("RGB", (8, 8), "white").save(img)
    rows = [
        {
            "id": f"p{i}",
            "image": "img.png",
            "caption": f"Colonic mucosa number {i}, FHL2 immunostain.",
            "inline_refs": [f"Sentence {i} (Fig. 1.{i})."],
            "subfield": "IHC",
            "difficulty": "easy",
            "figure": f"1.{i}",
            "source": "book.pdf",
            "image_sha256": f"h{i}",
        }
        for i in range(n)
    ]
    rows.append({**rows[0], "id": "other", "subfield": "other"})  # not a kept subfield: never sent
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    return tmp_path / "pairs.jsonl"


def scripted(body):
    user = body["messages"][1]["content"]
    pair = user.split("Colonic mucosa number ")[1][0]
    task = "mcq" if "multiple-choice" in user else "conversation" if "conversation" in user else "other"
    if pair == "1" and task == "other":
        return Reply('{"question": "Describe", "reasoning": ')  # malformed JSON
    if pair == "2" and task == "other":
        return Reply(json.dumps({**DESC, "reasoning": "the the the the the the the the " * 6}))  # repetitive
    if pair == "3" and task == "other":
        return Reply(
            json.dumps({**DESC, "answer": "FHL2阳性 colonic crypts lined by columnar epithelium."})
        )  # language mixing
    if task == "mcq":
        return Reply("<think>The user wants an MCQ.</think>" + json.dumps(MCQ))
    if task == "conversation":
        return Reply(json.dumps({"turns": [DESC, {**DESC, "question": "And the stroma?"}]}))
    return Reply(f"```json\n{json.dumps(DESC)}\n```")


def test_generate_parses_counts_bad_replies_and_qc_rejects_by_rule(tmp_path):
    src = pairs_file(tmp_path)
    with FakeOpenAI(scripted) as server:
        run_generate(
            str(src),
            str(tmp_path / "gen"),
            LLMSpec(server.url, "fake-r1", concurrency=4),
            tasks=("mcq", "description", "conversation"),
        )
        assert server.count == 4 * 3
        # text-only, as the paper: system + user strings, no image parts
        assert all([type(m["content"]) for m in r["messages"]] == [str, str] for r in server.requests)
    chats = read_jsonl(tmp_path / "gen" / "chat.jsonl")
    report = json.loads((tmp_path / "gen" / "generate_report.json").read_text())
    assert report["counts"]["bad:malformed_json"] == 1 and len(chats) == 11
    by = {(r["source_id"], r["task"]): r for r in chats}
    mcq = by[("p0", "mcq")]
    assert mcq["messages"][0]["content"][0] == {"type": "image"}
    assert mcq["messages"][1]["content"] == f"<think>{MCQ['reasoning']}</think><answer>A</answer>"
    assert mcq["mcq"]["options"] == MCQ["options"] and (mcq["subfield"], mcq["difficulty"]) == ("IHC", "easy")
    assert len(by[("p0", "conversation")]["messages"]) == 4
    assert os.path.exists(tmp_path / "gen" / mcq["images"][0])

    run_qc(str(tmp_path / "gen"), str(tmp_path / "qc"))
    rejected = {
        (r["source_id"], r["task"]): sorted(r["qc"]) for r in read_jsonl(tmp_path / "qc" / "rejected.jsonl")
    }
    assert rejected == {("p2", "description"): ["repetition"], ("p3", "description"): ["language_mixing"]}
    assert len(read_jsonl(tmp_path / "qc" / "chat.jsonl")) == 9
    table = (tmp_path / "qc" / "qc_report.csv").read_text().splitlines()
    assert (
        table[0]
        == "subfield,difficulty,task,total,passed,schema,mcq_options,format,language_mixing,repetition,length"
    )
    assert "IHC,easy,description,3,1,0,0,0,1,1,0" in table
    assert len(read_jsonl(tmp_path / "qc" / "review_sample.jsonl")) == 2 + 1 + 2  # <= 2 passed per stratum


def test_qc_rules_one_by_one():
    cfg = qc.QCConfig()
    base = {
        "id": "x",
        "caption": "Colon.",
        "task": "reasoning",
        "messages": [
            {"role": "user", "content": "q"},
            {
                "role": "assistant",
                "content": "<think>one two three four five six seven eight nine ten"
                "</think><answer>B</answer>",
            },
        ],
    }
    assert qc.check(base, cfg) == {}
    no_answer = {
        **base,
        "messages": [base["messages"][0], {"role": "assistant", "content": "<think>x</think> B"}],
    }
    assert list(qc.check(no_answer, cfg)) == ["format"]
    assert list(qc.check({**base, "messages": []}, cfg)) == ["schema"]
    short = {
        **base,
        "messages": [
            base["messages"][0],
            {"role": "assistant", "content": "<think>x</think><answer>B</answer>"},
        ],
    }
    assert list(qc.check(short, cfg)) == ["length"]
    assert qc.mcq_problems({"question": "Which?", "options": {"A": "x", "C": "y"}, "answer": "A"}) == [
        "letters 'AC' are not 2-6 contiguous from A"
    ]
    assert qc.mcq_problems(
        {
            "question": "Is it adenocarcinoma of colon?",
            "options": {"A": "adenocarcinoma of colon", "B": "x", "C": "x"},
            "answer": "D",
        }
    ) == ["duplicate option texts", "answer 'D' is not an option", "option A is repeated in the stem"]
    assert qc.repeated_ngrams("a b c d e f g h " * 4, 8) == 4 and qc.compression_ratio("ab" * 500) < 0.3
    assert qc.language_mixed("细胞 cells", "Colon.") and not qc.language_mixed(
        "纤维腺瘤的诊断", "图1 纤维腺瘤"
    )


KILLED = """
import sys
from pathor1_jax.cli import main
sys.exit(main(["curate", "generate", "--in", sys.argv[1], "--out", sys.argv[2], "--llm-url", sys.argv[3],
               "--llm-model", "fake-r1", "--tasks", "mcq,description", "--concurrency", "2"]))
"""


def test_kill_9_during_generate_then_rerun_resumes_from_the_cache(tmp_path):
    src = pairs_file(tmp_path, n=8)
    out = tmp_path / "gen"
    with FakeOpenAI(lambda body: Reply(scripted(body).content, delay_s=0.15)) as server:
        env = {**os.environ, "PYTHONPATH": os.getcwd()}
        proc = subprocess.Popen(
            [sys.executable, "-c", KILLED, str(src), str(out), server.url],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 120
        while server.count < 6 and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        cached = sum(
            1
            for line in (out / "llm_cache.jsonl").read_bytes().splitlines(keepends=True)
            if line.endswith(b"\n")
        )
        before = server.count
        assert 0 < cached < 16 and not (out / "chat.jsonl").exists()
        subprocess.run(
            [sys.executable, "-c", KILLED, str(src), str(out), server.url],
            env=env,
            check=True,
            capture_output=True,
        )
        assert server.count - before == 16 - cached  # no request paid twice
    assert len(read_jsonl(out / "chat.jsonl")) == 16 - 1  # pair 1: a malformed description


def test_largest_remainder_and_allocation_by_hand():
    assert largest_remainder(5, {"a": 6, "b": 3, "c": 1}) == {"a": 3, "b": 2, "c": 0}  # .5 tie: key order
    assert largest_remainder(7, {"a": 1, "b": 1}) == {"a": 1, "b": 1}  # capped by what there is
    assert largest_remainder(10, {"a": 5, "b": 3, "c": 2}) == {"a": 5, "b": 3, "c": 2}
    cands = (
        [{"subfield": "histopathology", "caption": "colon crypts"}] * 4
        + [{"subfield": "histopathology", "caption": "skin epidermis"}] * 2
        + [{"subfield": "IHC", "caption": "colon"}] * 3
        + [{"subfield": "FISH", "caption": "x"}]
    )
    # subfields 6/3/1 of n=5 -> 3, 1.5, 0.5 -> 3, 1, 1 (FISH wins the .5 tie by name); histo 4:2 of 3 -> 2, 1
    assert allocate(cands, 5) == {
        ("histopathology", "gastrointestinal"): 2,
        ("histopathology", "skin"): 1,
        ("IHC", ""): 1,
        ("FISH", ""): 1,
    }


def mcq_chat(i, subfield, caption, figure, image):
    return {
        "id": f"c{i:02d}",
        "task": "mcq",
        "subfield": subfield,
        "caption": caption,
        "source": "b.pdf",
        "figure": figure,
        "image_sha256": image,
        "images": ["img.png"],
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "<think>r</think><answer>A</answer>"},
        ],
        "mcq": {
            "question": "What is the most likely diagnosis?",
            "answer": "A",
            "options": {"A": "carcinoma", "B": "normal", "C": "lymphoma", "D": "polyp"},
        },
    }


def test_sample_is_stratified_disjoint_and_balances_letters(tmp_path):
    rows = [mcq_chat(i, "histopathology", "colon" if i < 8 else "skin", f"f{i}", f"h{i}") for i in range(12)]
    rows += [mcq_chat(12 + i, "IHC", "colon", f"g{i}", f"k{i}") for i in range(6)]
    rows.append({**mcq_chat(30, "IHC", "colon", "g0", "k0"), "task": "description"})  # same figure as an MCQ
    rl, sft, alloc = sample_rl(rows, 9, seed=0)
    # 12:6 of 9 -> 6 + 3; histopathology 8:4 of 6 -> 4 + 2
    assert alloc == {("histopathology", "gastrointestinal"): 4, ("histopathology", "skin"): 2, ("IHC", ""): 3}
    assert collections.Counter((r["subfield"], r["tissue_system"]) for r in rl) == {
        ("histopathology", "gastrointestinal"): 4,
        ("histopathology", "skin"): 2,
        ("IHC", "gastrointestinal"): 3,
    }  # recorded, not a stratum
    used = {(r["figure"], r["image_sha256"]) for r in rl}
    assert not any((r["figure"], r["image_sha256"]) in used for r in sft) and len(sft) == len(rows) - 9 - (
        ("g0", "k0") in used
    )
    letters = collections.Counter(r["answer"] for r in rl)
    assert max(letters.values()) - min(letters.values()) <= 1 and set(letters) == set("ABCD")
    for r in rl:
        assert r["options"][r["answer"]] == "carcinoma"
    assert sample_rl(rows, 9, seed=0)[0] == rl  # seeded
    write_jsonl(tmp_path / "chat.jsonl", rows)
    run_sample(str(tmp_path / "chat.jsonl"), str(tmp_path / "rl"), n=9)
    from pathor1_jax.data.jsonl import read_jsonl as read_records

    assert len(read_records(tmp_path / "rl" / "rl_mcq.jsonl", "mcq")) == 9

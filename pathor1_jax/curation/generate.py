"""generate: CoT SFT samples from figure–caption pairs with an LLM (paper §3.3), text-only input.

Each pair of a kept subfield with a difficulty gets one request per task (`--tasks`, default all 4),
built from the template of its (subfield, level, task) in `data/cot_templates.json` (ours: 5 × 3 × 4
= 60) with the caption and in-line references; no image is sent, as in the paper. The reply (after
`<think>` is stripped) must be the task's JSON; it becomes a `chat` record:
user `[image, question]` → assistant `<think>reasoning</think><answer>answer</answer>` (multi-turn:
one such pair per turn), with `subfield`, `difficulty`, `task`, and for MCQs the structured `mcq`
(question, options, answer) the RL sampler reads. Replies that are not that JSON are logged and
counted (`bad:malformed_json`, `bad:schema`), never fatal.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from pathor1_jax.data.llm import Completion, LLMError, LLMJSONError, Request, parse_json

from .io import Report, content_id

TASKS = ("mcq", "description", "reasoning", "conversation")
LEVELS = ("easy", "medium", "hard")


@cache
def templates() -> dict[str, Any]:
    data = json.loads(
        resources.files("pathor1_jax.curation").joinpath("data", "cot_templates.json").read_text()
    )
    data["by_key"] = {(t["subfield"], t["level"], t["task"]): t["user"] for t in data["templates"]}
    return data


def build_messages(pair: dict[str, Any], task: str) -> list[dict[str, str]]:
    t = templates()
    refs = "\n".join(f"- {s}" for s in pair.get("inline_refs") or []) or "(none)"
    user = t["by_key"][(pair["subfield"], pair["difficulty"], task)]
    user = user.replace("{caption}", pair["caption"]).replace("{inline_refs}", refs)
    return [{"role": "system", "content": t["system"]}, {"role": "user", "content": user}]


def _turn(obj: Any, where: str) -> tuple[str, str, str]:
    if not isinstance(obj, dict):
        raise LLMJSONError(f"{where}: expected an object with question/reasoning/answer")
    missing = [
        k
        for k in ("question", "reasoning", "answer")
        if not isinstance(obj.get(k), str) or not obj[k].strip()
    ]
    if missing:
        raise LLMJSONError(f"{where}: missing or empty field(s) {missing}")
    return obj["question"].strip(), obj["reasoning"].strip(), obj["answer"].strip()


def mcq_text(question: str, options: dict[str, str]) -> str:
    return question + "\n" + "\n".join(f"{k}. {v}" for k, v in options.items())


def to_chat(pair: dict[str, Any], task: str, reply: Completion) -> dict[str, Any]:
    """The chat record of one reply; raises `LLMJSONError` when the reply is not the task's JSON."""
    where = f"pair {pair['id']} task {task}"
    obj = parse_json(reply.content, where)
    extra: dict[str, Any] = {}
    if task == "conversation":
        turns_json = obj.get("turns") if isinstance(obj, dict) else None
        if not isinstance(turns_json, list) or not turns_json:
            raise LLMJSONError(f"{where}: expected 'turns', a non-empty list")
        turns = [_turn(t, f"{where} turn {i}") for i, t in enumerate(turns_json)]
    elif task == "mcq":
        q, reasoning, answer = _turn(obj, where)
        options = obj.get("options")
        if not isinstance(options, dict) or not all(isinstance(v, str) for v in options.values()):
            raise LLMJSONError(f"{where}: 'options' must be an object of letter -> text")
        turns = [(mcq_text(q, options), reasoning, answer)]
        extra["mcq"] = {"question": q, "options": options, "answer": answer}
    else:
        turns = [_turn(obj, where)]
    messages: list[dict[str, Any]] = []
    for i, (question, reasoning, answer) in enumerate(turns):
        content: list[dict[str, Any]] = [{"type": "text", "text": question}]
        if i == 0:
            content.insert(0, {"type": "image"})
        messages.append({"role": "user", "content": content})
        messages.append(
            {"role": "assistant", "content": f"<think>{reasoning}</think><answer>{answer}</answer>"}
        )
    return {
        "id": content_id(pair["id"], task, reply.key),
        "messages": messages,
        "images": [pair["image"]],
        "subfield": pair["subfield"],
        "difficulty": pair["difficulty"],
        "task": task,
        "source_id": pair["id"],
        "source": pair.get("source", ""),
        "figure": pair.get("figure", ""),
        "image_sha256": pair.get("image_sha256", ""),
        "caption": pair["caption"],
        "llm": {
            "finish_reason": reply.finish_reason,
            "usage": reply.usage,
            "reasoning_chars": len(reply.reasoning),
        },
        **extra,
    }


def generate_records(
    pairs: list[dict[str, Any]],
    client: Any,
    tasks: tuple[str, ...],
    params: dict[str, Any],
    progress: bool = True,
) -> tuple[list[dict[str, Any]], Report]:
    """Chat records of `pairs` × `tasks` through `client` (an `LLMClient`); bad replies counted."""
    report = Report()
    jobs = [(p, t) for p in pairs for t in tasks]
    replies = client.map(
        [Request(build_messages(p, t), params) for p, t in jobs], progress="generate" if progress else False
    )
    out = []
    for (pair, task), reply in zip(jobs, replies, strict=True):
        where = f"pair {pair['id']} task {task}"
        if isinstance(reply, LLMError):
            report.bad("llm_failed", where, str(reply))
            continue
        report.count("cached_replies" if reply.cached else "new_replies")
        try:
            out.append(to_chat(pair, task, reply))
        except LLMJSONError as e:
            report.bad(
                "malformed_json" if "not valid JSON" in str(e) or "empty reply" in str(e) else "schema",
                where,
                str(e),
            )
            continue
        report.count(f"records:{task}")
    return out, report

"""LLM judges for `pathor1 eval vlm`, through any OpenAI-compatible endpoint (`data.llm.LLMClient`).

Four judgments, each one chat request at temperature 0 whose reply must be one JSON object
(`data.llm.parse_json`: `<think>` removed, a ```json fence allowed, nothing else):

- `final_answer`: is an open-ended response's final answer the reference answer? → `{"correct": 0|1}`
  (the 0/1 final-answer judge of LlamaV-o1, the paper's [41]);
- `criteria`: the ten reasoning criteria of LlamaV-o1, each 1–10, higher is better →
  `{"faithfulness_step": …, …, "missing_step": …}`; `overall` = their mean (the paper's Fig. 5 plots
  final-answer accuracy and reasoning scores; which criteria it calls coherence / logical consistency
  is not stated, so all ten are reported);
- `option` / `yes_no`: read the answer of an MCQ / yes-no response that the rules of
  `eval.answers` could not (`{"option": "A".."F" | "Z"}`, `{"answer": "yes" | "no" | "unknown"}`;
  Z / unknown = the response gives none). These are counted apart from rule-read answers.

All prompt texts here are ours. A reply that is not the JSON asked for is asked again (up to
`retries` more times) with the error appended to the conversation, so every attempt is a distinct,
cacheable request; a judgment that still fails is a `JudgeError` (the evaluation records it and goes
on; nothing is guessed). Every request goes through the client's request-hash cache: an interrupted
evaluation resumes without paying for a judgment twice. Questions without a reference reasoning
(PathVQA, Quilt-VQA) are judged against the reference answer alone, which the prompt says.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pathor1_jax.data.llm import LLMClient, LLMError, LLMJSONError, parse_json

CRITERIA: dict[str, str] = {
    "faithfulness_step": "how closely the response's reasoning steps follow the reference's steps",
    "faithfulness_token": "whether the details inside each step (findings, terms, values) are true "
    "to the reference",
    "informativeness_step": "how much of the relevant information the steps bring out",
    "repetition_token": "absence of steps repeated or merely re-worded (10 = no repetition)",
    "hallucination": "absence of invented or irrelevant steps (10 = none)",
    "redundancy": "absence of steps that add nothing (10 = none)",
    "semantic_coverage_step": "how fully the steps cover the essential meaning of the reference",
    "reasoning_alignment": "overall agreement of the reasoning chain with the reference",
    "commonsense": "presence of the domain and commonsense knowledge the question needs",
    "missing_step": "absence of gaps: no necessary step left out (10 = none missing)",
}

SYSTEM = "You are a careful pathology examiner grading answers. Reply with one JSON object and nothing else."

FINAL_ANSWER_PROMPT = """Question:
{question}

Reference answer:
{reference}

Candidate response:
{response}

Does the candidate's final answer mean the same as the reference answer? Judge the meaning, not the
wording; a response that hedges between several answers, or gives none, is wrong.
Reply {{"correct": 1}} if it does, {{"correct": 0}} otherwise."""

CRITERIA_PROMPT = """Grade the reasoning of a response to a pathology question against a reference.

Question:
{question}

Reference:
{reference}

Candidate response:
{response}

Score each criterion from 1 (worst) to 10 (best):
{criteria}

Bands: 9-10 fully meets the criterion, 7-8 minor lapses, 5-6 clear lapses, 3-4 serious lapses,
1-2 fails it. When the reference is a short answer without reasoning, judge the steps by whether
they soundly lead to it.
Reply with a JSON object with exactly these integer fields: {keys}."""

OPTION_PROMPT = """A model answered a multiple-choice question. Which option did it choose?

Question:
{question}

Options:
{options}

Response:
{response}

Reply {{"option": "<letter>"}} with the letter of the option the response finally chooses, or
{{"option": "Z"}} if it chooses none, several, or refuses."""

YES_NO_PROMPT = """A model answered a yes/no question. What was its answer?

Question:
{question}

Response:
{response}

Reply {{"answer": "yes"}}, {{"answer": "no"}}, or {{"answer": "unknown"}} if the response does not
clearly answer yes or no."""


class JudgeError(RuntimeError):
    """A judgment that could not be obtained (request failures, or no valid JSON after retries)."""


def _reference(answer: str, reasoning: str) -> str:
    if reasoning:
        return f"{reasoning}\nFinal answer: {answer}"
    return f"{answer}\n(The reference gives the final answer only, without reasoning steps.)"


def _require(obj: Any, key: str, allowed: tuple, normalize=None) -> Any:
    """`obj[key]` when it is one of `allowed` (after `normalize`, for strings)."""
    if not isinstance(obj, dict) or key not in obj:
        raise LLMJSONError(f'expected a JSON object with the field "{key}"')
    value = obj[key]
    if isinstance(value, str) and normalize is not None:
        value = normalize(value.strip())
    if isinstance(value, bool) or value not in allowed:
        raise LLMJSONError(f'field "{key}" must be one of {list(allowed)}, got {obj[key]!r}')
    return value


def _scores(obj: Any) -> dict[str, int]:
    if not isinstance(obj, dict):
        raise LLMJSONError("expected a JSON object of criterion scores")
    missing = [k for k in CRITERIA if k not in obj]
    if missing:
        raise LLMJSONError(f"missing criteria {missing}")
    out = {}
    for k in CRITERIA:
        v = obj[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or not 1 <= v <= 10:
            raise LLMJSONError(f"criterion {k!r} must be an integer from 1 to 10, got {v!r}")
        out[k] = int(v)
    return out


class Judge:
    """The judgments above, through `client` (whose model is the judge)."""

    def __init__(self, client: LLMClient, *, retries: int = 2, max_tokens: int = 1024):
        self.client = client
        self.retries = retries
        self.max_tokens = max_tokens

    def _ask(self, prompt: str, read, where: str):
        messages: list[dict[str, str]] = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": prompt},
        ]
        for attempt in range(self.retries + 1):
            try:
                reply = self.client.complete(messages, temperature=0.0, max_tokens=self.max_tokens)
            except LLMError as e:
                raise JudgeError(f"{where}: {e}") from e
            try:
                return read(parse_json(reply.text, where=where))
            except LLMJSONError as e:
                if attempt == self.retries:
                    raise JudgeError(f"{where}: no valid JSON after {attempt + 1} attempt(s): {e}") from None
                messages = [
                    *messages,
                    {"role": "assistant", "content": reply.text},
                    {
                        "role": "user",
                        "content": f"That reply was not valid: {e}. Reply with the JSON object only.",
                    },
                ]
        raise AssertionError("unreachable")

    def final_answer(self, question: str, answer: str, response: str, *, where: str = "judge") -> bool:
        prompt = FINAL_ANSWER_PROMPT.format(question=question, reference=answer, response=response)
        return self._ask(prompt, lambda obj: _require(obj, "correct", (0, 1)), where) == 1

    def criteria(
        self, question: str, answer: str, response: str, reasoning: str = "", *, where: str = "judge"
    ) -> dict[str, int]:
        listed = "\n".join(f"- {k}: {v}" for k, v in CRITERIA.items())
        prompt = CRITERIA_PROMPT.format(
            question=question,
            reference=_reference(answer, reasoning),
            response=response,
            criteria=listed,
            keys=", ".join(CRITERIA),
        )
        return self._ask(prompt, _scores, where)

    def option(
        self, question: str, options: Mapping[str, str], response: str, *, where: str = "judge"
    ) -> str | None:
        listed = "\n".join(f"{k}. {v}" for k, v in options.items())
        prompt = OPTION_PROMPT.format(question=question, options=listed, response=response)
        letter = self._ask(prompt, lambda obj: _require(obj, "option", (*options, "Z"), str.upper), where)
        return None if letter == "Z" else letter

    def yes_no(self, question: str, response: str, *, where: str = "judge") -> str | None:
        prompt = YES_NO_PROMPT.format(question=question, response=response)
        answer = self._ask(
            prompt, lambda obj: _require(obj, "answer", ("yes", "no", "unknown"), str.lower), where
        )
        return None if answer == "unknown" else answer


def overall(scores: Mapping[str, int]) -> float:
    """The mean of the ten criteria (LlamaV-o1's "Overall Score")."""
    return sum(scores[k] for k in CRITERIA) / len(CRITERIA)

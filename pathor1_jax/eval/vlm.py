"""`pathor1 eval vlm`: the paper's VLM benchmarks (section 4.4) for any checkpoint, here or served elsewhere.

    pathor1 eval vlm --model runs/sft --data pathmmu_test_tiny.jsonl,pathvqa_yes_no.jsonl \\
        --prompt-style patho_r1,patho_r1_cod --out runs/eval_sft
    pathor1 eval vlm --url http://gpu-box:8000/v1 --data PathMMU_VAL.tsv --out runs/eval_served \\
        --judge-url https://api.deepseek.com/v1 --judge-model deepseek-reasoner   # key: OPENAI_API_KEY

**Data** (`--data`, comma-separated): `mcq` and `vqa` JSONL files (the kind is read from each file's
first record), VLMEvalKit TSV files (imported on the fly, `data.vlmevalkit`), or `demo` (the demo's
held-out MCQs). Records carry `benchmark` / `category` / `split`, which group the scores.

**Generation**: every question is asked once per `--prompt-style` (`data.prompts`: `patho_r1` = the
authors' CoT prompt, `patho_r1_cod` = their Chain-of-Draft prompt, `vlmevalkit`, `plain`), greedy,
up to `--max-new-tokens` (2048, as the authors' inference script). In process (`--model`: the model
sharded over `--mesh`, rows batched by the serving engine) or through any OpenAI-compatible endpoint
(`--url`: `pathor1 serve`, vLLM, ...; images sent as data URIs, `--concurrency` requests in flight).

**Scoring**: MCQ and yes/no answers are read by `eval.answers`' rules; an unparsable answer is
wrong. With `--judge-url` / `--judge-model` an LLM (`eval.judge`) resolves the unparsable ones
(reported separately) and judges open-ended answers: the 0/1 final-answer judgment and the ten
LlamaV-o1 reasoning criteria.

**Outputs** in `--out`: `predictions.jsonl` (one line per prompt style and question, appended as
generated; a rerun skips what is there and re-judges only what has no judgment), `judge_cache.jsonl`
(every judge reply by request hash: a rerun pays for none twice), and the tables in the paper's layout
(`report.md`, `report.json`, `report.csv`, `report.png`; see `eval.vlm_report`).
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import io
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from pathor1_jax.data.images import read_image_bytes
from pathor1_jax.data.prompts import DEFAULT_PROMPT_STYLE, PROMPT_STYLES, question_messages
from pathor1_jax.data.records import GROUP_FIELDS, ImagePart, MCQRecord, Message, TextPart, VQARecord
from pathor1_jax.errors import Pathor1Error, UserError
from pathor1_jax.eval.answers import extract_option, extract_yes_no

PREDICTIONS = "predictions.jsonl"
JUDGE_CACHE = "judge_cache.jsonl"

Generated = tuple[str, int, str]  # response text, generated tokens, finish reason


def read_eval_records(sources: Sequence[str]) -> list[MCQRecord | VQARecord]:
    """The questions of every source (JSONL of mcq or vqa records, VLMEvalKit TSV, or "demo")."""
    from pathor1_jax.data.demo import demo_records
    from pathor1_jax.data.jsonl import read_jsonl
    from pathor1_jax.data.vlmevalkit import read_vlmevalkit_tsv

    records: list[MCQRecord | VQARecord] = []
    for source in sources:
        if source == "demo":
            records += [
                dataclasses.replace(r, benchmark="demo", split="test") for r in demo_records("mcq", "test")
            ]
        elif source.endswith(".tsv"):
            records += read_vlmevalkit_tsv(source).records
        else:
            records += read_jsonl(source, _jsonl_kind(source))
    seen: set[str] = set()
    for r in records:
        if r.id in seen:
            raise UserError(f"--data: question id {r.id!r} occurs twice (ids must be unique across files)")
        seen.add(r.id)
    return records


def _jsonl_kind(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                obj = json.loads(line)
                return "mcq" if isinstance(obj, dict) and "options" in obj else "vqa"
    raise UserError(f"{path}: no records")


def question_kind(record: MCQRecord | VQARecord) -> str:
    """ "mcq", "yes_no" or "open"."""
    return "mcq" if isinstance(record, MCQRecord) else record.answer_type


def prompt_messages(record: MCQRecord | VQARecord, style: str) -> tuple[Message, ...]:
    options = record.options if isinstance(record, MCQRecord) else {}
    return question_messages(record.question, options, record.images, style)


def score(record: MCQRecord | VQARecord, response: str) -> dict:
    """The rule-read answer of a response and whether it is right (None: needs a judge)."""
    kind = question_kind(record)
    if kind == "open":
        return {"extracted": None, "resolved_by": None, "correct": None}
    extracted = extract_option(response, record.options) if kind == "mcq" else extract_yes_no(response)
    return {
        "extracted": extracted,
        "resolved_by": "rules" if extracted is not None else None,
        "correct": extracted == record.answer,
    }


def prediction(record: MCQRecord | VQARecord, style: str, generated: Generated) -> dict:
    text, num_tokens, finish_reason = generated
    return {
        "id": record.id,
        "prompt_style": style,
        "kind": question_kind(record),
        **{k: getattr(record, k) for k in GROUP_FIELDS},
        "answer": record.answer,
        "response": text,
        "num_tokens": num_tokens,
        "finish_reason": finish_reason,
        **score(record, text),
    }


# ------------------------------------------------------------------------------------ backends


def data_uri(data: bytes) -> str:
    from PIL import Image

    kind = (Image.open(io.BytesIO(data)).format or "png").lower()
    return f"data:image/{kind};base64,{base64.b64encode(data).decode('ascii')}"


def openai_messages(messages: Sequence[Message], record_id: str = "") -> list[dict]:
    """Our messages as OpenAI chat messages (images inline as data URIs, in order)."""
    out = []
    for m in messages:
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        parts = []
        for p in m.content:
            if isinstance(p, TextPart):
                parts.append({"type": "text", "text": p.text})
            elif isinstance(p, ImagePart) and p.image is not None:
                url = data_uri(read_image_bytes(p.image, record_id=record_id))
                parts.append({"type": "image_url", "image_url": {"url": url}})
        out.append({"role": m.role, "content": parts})
    return out


class InProcess:
    """Generation with the serving engine on this host's devices."""

    def __init__(self, engine, batch_size: int):
        self.engine = engine
        self.batch_size = min(batch_size, engine.max_batch)

    def generate(self, chats: Sequence[tuple[str, tuple[Message, ...]]], max_tokens: int) -> list[Generated]:
        from pathor1_jax.serve.engine import RequestError, Row, SamplingParams

        params = SamplingParams(max_tokens=max_tokens)
        rows = []
        for rid, messages in chats:
            try:
                rows.append(Row(self.engine.encode(messages, rid), params))
                self.engine.check(rows[-1].prompt, params)
            except RequestError as e:
                raise UserError(f"question {rid!r}: {e}") from None
        return [(r.text, r.num_tokens, r.finish_reason) for r in self.engine.run(rows)]


class Endpoint:
    """Generation through an OpenAI-compatible endpoint (greedy; no response cache: the predictions
    file is the record of what was generated)."""

    def __init__(self, url: str, model: str, concurrency: int):
        from pathor1_jax.data.llm import LLMClient

        self.client = LLMClient(url, model, max_concurrency=concurrency)
        self.batch_size = 4 * concurrency

    def generate(self, chats: Sequence[tuple[str, tuple[Message, ...]]], max_tokens: int) -> list[Generated]:
        from pathor1_jax.data.llm import LLMError, Request

        requests = [
            Request(openai_messages(messages, rid), {"max_tokens": max_tokens, "temperature": 0.0})
            for rid, messages in chats
        ]
        out = []
        for (rid, _), reply in zip(chats, self.client.map(requests), strict=True):
            if isinstance(reply, LLMError):
                raise Pathor1Error(
                    f"question {rid!r}: {reply} (the predictions so far are kept; rerun to resume)"
                )
            out.append((reply.text, int(reply.usage.get("completion_tokens", 0)), reply.finish_reason))
        return out


def served_model_name(url: str) -> str:
    """The first model an endpoint lists (`GET /v1/models`)."""
    import openai

    client = openai.OpenAI(base_url=url, api_key=os.environ.get("OPENAI_API_KEY") or "EMPTY")
    try:
        models = client.models.list().data
    except openai.OpenAIError as e:
        raise UserError(f"--url {url}: cannot list its models ({type(e).__name__}: {e})") from None
    if not models:
        raise UserError(f"--url {url}: the endpoint lists no model; pass --served-model")
    return models[0].id


# ------------------------------------------------------------------------------------ the run


def read_predictions(path: Path) -> list[dict]:
    """Predictions written so far; a torn last line (an interrupted run) is dropped."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1 and any(x.strip() for x in lines[i + 1 :]):
                raise UserError(f"{path}:{i + 1}: corrupt prediction line (not a torn last line)") from None
    with open(path, "w", encoding="utf-8") as f:  # rewrite without the torn line
        f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in out)
    return out


def write_predictions(path: Path, predictions: Sequence[dict]) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions), encoding="utf-8")
    os.replace(tmp, path)


def generate_missing(
    records: Sequence[MCQRecord | VQARecord],
    styles: Sequence[str],
    backend,
    out: Path,
    *,
    max_new_tokens: int,
    progress: bool = True,
) -> list[dict]:
    """Generate every (style, question) not yet in `out/predictions.jsonl`, appending as it goes."""
    path = out / PREDICTIONS
    predictions = read_predictions(path)
    done = {(p["prompt_style"], p["id"]) for p in predictions}
    todo = [(s, r) for s in styles for r in records if (s, r.id) not in done]
    with (
        open(path, "a", encoding="utf-8") as f,
        tqdm(total=len(todo), desc="eval vlm", disable=not progress) as bar,
    ):
        for start in range(0, len(todo), backend.batch_size):
            chunk = todo[start : start + backend.batch_size]
            generated = backend.generate([(r.id, prompt_messages(r, s)) for s, r in chunk], max_new_tokens)
            for (style, record), g in zip(chunk, generated, strict=True):
                p = prediction(record, style, g)
                predictions.append(p)
                f.write(json.dumps(p, ensure_ascii=False) + "\n")
            f.flush()
            bar.update(len(chunk))
    return predictions


def needs_judge(p: dict) -> bool:
    judged = "judge" in p and "error" not in p["judge"]
    return not judged and (p["kind"] == "open" or p["extracted"] is None)


def judge_predictions(
    predictions: list[dict],
    records: dict[str, MCQRecord | VQARecord],
    judge,
    *,
    workers: int,
    progress: bool = True,
) -> None:
    """Fill `judge` (and `correct` / `extracted` where the judge decides) of the predictions that need
    one; failures are recorded as `{"error": ...}` and retried by the next run."""
    todo = [p for p in predictions if needs_judge(p) and p["id"] in records]

    def one(p: dict) -> None:
        from pathor1_jax.eval.judge import JudgeError, overall

        record, where = records[p["id"]], f"question {p['id']!r} ({p['prompt_style']})"
        try:
            if p["kind"] == "open":
                correct = judge.final_answer(record.question, record.answer, p["response"], where=where)
                scores = judge.criteria(
                    record.question, record.answer, p["response"], record.reasoning, where=where
                )
                p["judge"] = {"correct": correct, "criteria": scores, "overall": overall(scores)}
                p["correct"] = correct
            else:
                if p["kind"] == "mcq":
                    found = judge.option(record.question, record.options, p["response"], where=where)
                else:
                    found = judge.yes_no(record.question, p["response"], where=where)
                p["judge"] = {"extracted": found}
                if found is not None:
                    p.update(extracted=found, resolved_by="judge", correct=found == record.answer)
        except JudgeError as e:
            p["judge"] = {"error": str(e)}

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(tqdm(pool.map(one, todo), total=len(todo), desc="judge", disable=not progress))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `pathor1 eval vlm`."""
    from pathor1_jax.serve.loading import add_model_arguments

    add_model_arguments(parser, required=False)
    parser.add_argument("--url", default="", help="OpenAI-compatible endpoint to evaluate instead of --model")
    parser.add_argument(
        "--served-model", default="", help="model name at --url (default: the first it lists)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=8, help="requests in flight to --url / --judge-url"
    )
    parser.add_argument(
        "--data", required=True, help='mcq / vqa JSONL or VLMEvalKit TSV files, comma-separated, or "demo"'
    )
    parser.add_argument(
        "--prompt-style", default=DEFAULT_PROMPT_STYLE, help=f"comma-separated, of {sorted(PROMPT_STYLES)}"
    )
    parser.add_argument("--max-new-tokens", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8, help="questions per in-process batch")
    parser.add_argument("--limit", type=int, default=0, help="the first N questions only (0 = all)")
    parser.add_argument("--out", required=True, help="output folder (predictions, tables, plots)")
    parser.add_argument("--judge-url", default="", help="OpenAI-compatible endpoint of the LLM judge")
    parser.add_argument("--judge-model", default="", help="the judge model's name at --judge-url")
    parser.add_argument(
        "--judge-key-env", default="OPENAI_API_KEY", help="environment variable of the judge's key"
    )


def run(args: argparse.Namespace) -> int:
    """`pathor1 eval vlm`: generate, judge, write the tables; print the report's path and summary."""
    from pathor1_jax.eval.vlm_report import build_report, write_report
    from pathor1_jax.outputs import check_writable_dir

    if bool(args.model) == bool(args.url):
        raise UserError("give exactly one of --model (evaluate in process) and --url (an endpoint)")
    if bool(args.judge_url) != bool(args.judge_model):
        raise UserError("--judge-url and --judge-model go together")
    styles = [s.strip() for s in args.prompt_style.split(",") if s.strip()]
    unknown = [s for s in styles if s not in PROMPT_STYLES]
    if unknown or not styles:
        raise UserError(f"--prompt-style: unknown {unknown}; styles are {sorted(PROMPT_STYLES)}")
    records = read_eval_records([s for s in args.data.split(",") if s])
    records = records[: args.limit] if args.limit else records
    if not records:
        raise UserError(f"--data {args.data}: no questions")
    out = check_writable_dir(args.out, "--out")
    if args.url:
        backend = Endpoint(args.url, args.served_model or served_model_name(args.url), args.concurrency)
        source = {"url": args.url, "model": backend.client.model}
    else:
        from pathor1_jax.serve.loading import engine_from_args

        backend = InProcess(engine_from_args(args), args.batch_size)
        source = {"model": str(args.model)}
    predictions = generate_missing(records, styles, backend, out, max_new_tokens=args.max_new_tokens)
    if args.judge_url:
        from pathor1_jax.data.llm import LLMClient
        from pathor1_jax.eval.judge import Judge

        client = LLMClient(
            args.judge_url,
            args.judge_model,
            api_key_env=args.judge_key_env,
            cache=out / JUDGE_CACHE,
            max_concurrency=args.concurrency,
        )
        with client:
            judge_predictions(
                predictions, {r.id: r for r in records}, Judge(client), workers=args.concurrency
            )
        write_predictions(out / PREDICTIONS, predictions)
        source["judge"] = {"url": args.judge_url, "model": args.judge_model}
    wanted = {(s, r.id) for s in styles for r in records}
    report = build_report([p for p in predictions if (p["prompt_style"], p["id"]) in wanted])
    report["settings"] = {
        **source,
        "prompt_styles": styles,
        "max_new_tokens": args.max_new_tokens,
        "data": args.data,
        "greedy": True,
    }
    write_report(report, out)
    print(json.dumps({"out": str(out), **report["summary"]}))
    return 0

"""A client for any OpenAI-compatible chat endpoint, shared by curation (CoT generation, in-line
references) and evaluation (LLM judges).

    client = LLMClient("http://127.0.0.1:8000/v1", "deepseek-r1", cache="runs/gen/llm_cache.jsonl")
    reply = client.complete([{"role": "user", "content": "..."}], temperature=0.6, max_tokens=2048)
    obj = parse_json(reply.content, where="record abc")       # <think> already stripped
    replies = client.map(list_of_requests)                      # bounded concurrency, in order

- **Key from the environment only**: the variable named by `api_key_env` (default `OPENAI_API_KEY`);
  unset means a keyless local server (vLLM, SGLang, `pathor1 serve`). Keys never enter a cache.
- **Bounded concurrency**: `map` runs at most `max_concurrency` requests at once (a thread pool).
- **Retries**: timeouts, connection errors, HTTP 429 and 5xx are retried up to `max_retries` times
  with exponential backoff (`backoff_s * 2**attempt`, capped at `backoff_max_s`, a `Retry-After`
  header honoured within the cap); other HTTP errors (400, 401, 404, ...) fail at once.
- **Request-hash cache**: every successful reply is appended to a JSONL file under the key
  sha256(model, messages, params), one `write` per line, so a run killed at any instant (kill -9)
  leaves at most one torn last line, which the next run drops with a warning. A rerun pays for no
  request twice. Failures are not cached (a rerun retries them); replies that a caller cannot parse
  are (they are what the model answers for that request).
- **Reasoning**: `<think>…</think>` (and a server's separate `reasoning_content`) is split off the
  reply: `Completion.content` is the answer only, `Completion.reasoning` the thoughts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import threading
import time
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

Messages = Sequence[dict[str, Any]]


class LLMError(RuntimeError):
    """A request that failed for good (after retries, or at once for a non-retryable HTTP status)."""


class LLMJSONError(ValueError):
    """A reply that is not the JSON the caller asked for; the message says where and why."""


@dataclasses.dataclass(frozen=True)
class Completion:
    """One reply. `text`: the raw message content; `content`: it with reasoning removed."""

    key: str  # the request hash
    text: str
    content: str
    reasoning: str
    finish_reason: str
    usage: dict[str, int]
    cached: bool = False


@dataclasses.dataclass(frozen=True)
class Request:
    """One chat request for `LLMClient.map`: messages plus sampling parameters (temperature, ...)."""

    messages: Messages
    params: dict[str, Any] = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------
# Reasoning and JSON


_THINK_BLOCK = re.compile(r"<think>(.*?)</think>", re.DOTALL)


def strip_think(text: str) -> tuple[str, str]:
    """(answer, reasoning) of a reply: `<think>…</think>` blocks removed from the answer.

    A reply whose opening `<think>` was eaten by the server's template (`…reasoning</think>answer`)
    loses everything up to the last `</think>`; an unclosed `<think>` (the model ran out of tokens
    while thinking) leaves an empty answer.
    """
    thoughts = [m.strip() for m in _THINK_BLOCK.findall(text)]
    rest = _THINK_BLOCK.sub("", text)
    if "</think>" in rest:  # an orphan closing tag: what precedes it is reasoning
        head, _, rest = rest.rpartition("</think>")
        thoughts.append(head.replace("<think>", "").strip())
    if "<think>" in rest:  # an unclosed block: the rest is reasoning
        rest, _, tail = rest.partition("<think>")
        thoughts.append(tail.strip())
    return rest.strip(), "\n".join(t for t in thoughts if t)


_FENCE = re.compile(r"^```(?:json|JSON)?\s*\n(.*?)\n?```$", re.DOTALL)


def parse_json(text: str, where: str = "reply") -> Any:
    """The JSON value of a reply: the whole text, or the only ```json fenced block, after `<think>`.

    Strict: prose around the JSON is an error (a model that adds it is not following the prompt).
    Raises `LLMJSONError` naming `where`, the JSON error and the start of the text.
    """
    body, _ = strip_think(text)
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1).strip()
    if not body:
        raise LLMJSONError(f"{where}: empty reply (no JSON after removing reasoning)")
    try:
        return json.loads(body)
    except json.JSONDecodeError as e:
        raise LLMJSONError(
            f"{where}: reply is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}; "
            f"reply starts {body[:80]!r}"
        ) from None


# ---------------------------------------------------------------------------------------------------
# Cache


def request_key(model: str, messages: Messages, params: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of (model, messages, params): the cache key of a request."""
    blob = json.dumps(
        {"model": model, "messages": list(messages), "params": params},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ResponseCache:
    """An append-only JSONL file of replies by request key; safe against kill -9 at any instant.

    One line per reply, written by a single `os.write` on an O_APPEND descriptor. On open, a torn
    last line (no newline, or not JSON) is cut off with a warning; a bad line elsewhere is an error
    naming file and line (that is not what a crash leaves). One process per cache file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._lock = threading.Lock()
        self._entries: dict[str, dict[str, Any]] = {}
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._load()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _load(self) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path, "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            newline = data.find(b"\n", pos)
            if newline == -1:  # a line without its newline: the write was cut
                break
            line = data[pos:newline]
            if line.strip():
                try:
                    entry = json.loads(line)
                    self._entries[entry["key"]] = entry
                except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
                    if newline + 1 < len(data):
                        lineno = data.count(b"\n", 0, pos) + 1
                        raise ValueError(
                            f"{self.path}:{lineno}: corrupt cache line ({e}), not a torn write"
                        ) from None
                    break
            pos = newline + 1
        if pos < len(data):
            warnings.warn(
                f"{self.path}: dropped a torn last line ({len(data) - pos} bytes) left by an interrupted run",
                stacklevel=3,
            )
            with open(self.path, "r+b") as f:
                f.truncate(pos)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> dict[str, Any] | None:
        return self._entries.get(key)

    def put(self, key: str, reply: dict[str, Any]) -> None:
        entry = {"key": key, **reply}
        line = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            os.write(self._fd, line)
            self._entries[key] = entry

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# ---------------------------------------------------------------------------------------------------
# Client


def _retry_after(error: Exception) -> float | None:
    response = getattr(error, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class LLMClient:
    """Chat completions from one model behind an OpenAI-compatible `base_url` (see module doc)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        cache: str | os.PathLike | ResponseCache | None = None,
        max_concurrency: int = 8,
        max_retries: int = 4,
        timeout_s: float = 600.0,
        backoff_s: float = 1.0,
        backoff_max_s: float = 60.0,
    ):
        try:
            import openai
        except ImportError as e:
            raise ImportError("the LLM client needs `openai`: pip install 'pathor1_jax[llm]'") from e
        if max_concurrency < 1 or max_retries < 0:
            raise ValueError(
                f"need max_concurrency >= 1 and max_retries >= 0, got {max_concurrency}, {max_retries}"
            )
        self._openai = openai
        self.base_url = base_url
        self.model = model
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.cache = ResponseCache(cache) if isinstance(cache, (str, os.PathLike)) else cache
        self.stats = {"requests": 0, "cache_hits": 0, "retries": 0, "failures": 0}
        self._stats_lock = threading.Lock()
        self._client = openai.OpenAI(
            base_url=base_url,
            api_key=os.environ.get(api_key_env) or "EMPTY",  # keyless servers accept any token
            timeout=timeout_s,
            max_retries=0,  # retries are ours: counted, and with our backoff
        )

    def _count(self, name: str) -> None:
        with self._stats_lock:
            self.stats[name] += 1

    def _retryable(self, error: Exception) -> bool:
        o = self._openai
        if isinstance(
            error, (o.APITimeoutError, o.APIConnectionError, o.RateLimitError, o.InternalServerError)
        ):
            return True
        return isinstance(error, o.APIStatusError) and error.status_code >= 500

    def _call(self, messages: Messages, params: dict[str, Any]) -> dict[str, Any]:
        attempt = 0
        while True:
            try:
                self._count("requests")
                response = self._client.chat.completions.create(
                    model=self.model, messages=list(messages), **params
                )
                choice = response.choices[0]
                extra = choice.message.model_extra or {}
                usage = response.usage.model_dump() if response.usage is not None else {}
                return {
                    "text": choice.message.content or "",
                    "reasoning_content": extra.get("reasoning_content") or extra.get("reasoning") or "",
                    "finish_reason": choice.finish_reason or "",
                    "usage": {k: v for k, v in usage.items() if isinstance(v, int)},
                }
            except self._openai.OpenAIError as e:
                if not self._retryable(e) or attempt >= self.max_retries:
                    self._count("failures")
                    raise LLMError(
                        f"{self.base_url} model {self.model!r}: request failed after {attempt + 1} "
                        f"attempt(s): {type(e).__name__}: {str(e)[:200]}"
                    ) from e
                delay = min(self.backoff_max_s, self.backoff_s * 2**attempt) * random.uniform(1.0, 1.25)
                hinted = _retry_after(e)
                if hinted is not None:
                    delay = min(self.backoff_max_s, max(delay, hinted))
                self._count("retries")
                attempt += 1
                time.sleep(delay)

    def complete(self, messages: Messages, **params: Any) -> Completion:
        """One chat completion (from the cache when this exact request was answered before)."""
        key = request_key(self.model, messages, params)
        entry = self.cache.get(key) if self.cache is not None else None
        cached = entry is not None
        if cached:
            self._count("cache_hits")
        else:
            entry = self._call(messages, params)
            if self.cache is not None:
                self.cache.put(key, entry)
        content, thoughts = strip_think(entry["text"])
        reasoning = "\n".join(t for t in (entry.get("reasoning_content", ""), thoughts) if t)
        return Completion(
            key, entry["text"], content, reasoning, entry["finish_reason"], entry["usage"], cached
        )

    def map(
        self, requests: Iterable[Request], *, progress: bool | str = False
    ) -> list[Completion | LLMError]:
        """Replies to `requests` in their order, at most `max_concurrency` in flight; a request that
        fails for good yields its `LLMError` in its place instead of stopping the others."""
        requests = list(requests)

        def one(request: Request) -> Completion | LLMError:
            try:
                return self.complete(request.messages, **request.params)
            except LLMError as e:
                return e

        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            results = pool.map(one, requests)
            if progress:
                from tqdm import tqdm

                desc = progress if isinstance(progress, str) else "llm"
                results = tqdm(results, total=len(requests), desc=desc, unit="req")
            return list(results)

    def close(self) -> None:
        self._client.close()
        if self.cache is not None:
            self.cache.close()

    def __enter__(self) -> LLMClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

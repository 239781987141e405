"""The OpenAI-compatible HTTP API of `pathor1 serve` (FastAPI; run by uvicorn).

- `POST /v1/chat/completions`: `model`, `messages` (roles system / user / assistant; content a
  string or parts `{"type": "text", "text"}` and `{"type": "image_url", "image_url": {"url":
  "data:image/...;base64,..."}}` — images travel inline, the server fetches nothing), `max_tokens`
  (or `max_completion_tokens`; default `min(default_max_tokens, context − prompt)`), `temperature`
  (default 1, as OpenAI; 0 = greedy), `top_p`, `stop` (a string or up to 4), `n`, `stream` (server-sent
  events, `stream_options.include_usage`). Other OpenAI fields are accepted and ignored.
- `GET /v1/models`: the one served model. `GET /health`: status and batching counters (requests,
  batches, rows per batch, queue length, compiled shapes).

Errors are OpenAI-shaped JSON `{"error": {"message", "type", "param", "code"}}`: 400 for a malformed
body, an undecodable image or a prompt over the context; 404 for an unknown model; 503 (with
`Retry-After`) when the request queue is full; 500 if generation itself fails — the server keeps
serving in every case.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from pathor1_jax.data.records import ImagePart, ImageRef, Message, TextPart
from pathor1_jax.serve.engine import RequestError, Row, SamplingParams
from pathor1_jax.serve.scheduler import QueueFull, Scheduler

MAX_STOP_STRINGS = 4


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextContent(_Body):
    type: Literal["text"]
    text: str


class ImageURL(_Body):
    url: str


class ImageContent(_Body):
    type: Literal["image_url"]
    image_url: ImageURL | str


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: str | list[Annotated[TextContent | ImageContent, Field(discriminator="type")]]


class StreamOptions(_Body):
    include_usage: bool = False


class ChatRequest(_Body):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def _error(status: int, message: str, code: str, param: str | None = None, headers=None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 503:
        kind = "overloaded_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def decode_data_uri(url: str, where: str) -> bytes:
    """The bytes of a `data:<type>;base64,<data>` URI; anything else is a 400."""
    head, sep, data = url.partition(",")
    if not url.startswith("data:") or not sep or not head.endswith(";base64"):
        raise APIError(
            400,
            f"{where}: images must be data URIs (data:image/...;base64,...); the server fetches "
            f"nothing, got {url[:40]!r}",
            "invalid_image",
            where,
        )
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise APIError(400, f"{where}: invalid base64 image data ({e})", "invalid_image", where) from None


def to_messages(messages: list[ChatMessage]) -> tuple[Message, ...]:
    """OpenAI chat messages → our `Message`s (images inline, in order)."""
    out = []
    for i, m in enumerate(messages):
        if isinstance(m.content, str):
            out.append(Message(m.role, m.content))
            continue
        parts: list[TextPart | ImagePart] = []
        for j, part in enumerate(m.content):
            if isinstance(part, TextContent):
                parts.append(TextPart(part.text))
            else:
                url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
                data = decode_data_uri(url, f"messages[{i}].content[{j}].image_url")
                parts.append(ImagePart(ImageRef(data=data)))
        out.append(Message(m.role, tuple(parts)))
    return tuple(out)


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_STRINGS or not all(stops):
        raise APIError(400, f"stop: at most {MAX_STOP_STRINGS} non-empty strings", "invalid_value", "stop")
    return tuple(stops)


def create_app(scheduler: Scheduler, model_name: str, *, default_max_tokens: int = 2048) -> FastAPI:
    """The API over a started `Scheduler` serving `model_name`."""
    engine = scheduler.engine
    app = FastAPI(title="pathor1 serve", description=__doc__.splitlines()[0])

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return _error(e.status, e.message, e.code, e.param)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or "body"
        return _error(
            400, f"malformed request: {where}: {first.get('msg', 'invalid')}", "invalid_body", where
        )

    @app.get("/health")
    async def health() -> dict:
        devices = 1 if engine.mesh is None else engine.mesh.size
        return {"status": "ok", "model": model_name, "devices": devices, **scheduler.stats()}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "pathor1"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        if body.model != model_name:
            raise APIError(
                404,
                f"model {body.model!r} does not exist; this server serves {model_name!r}",
                "model_not_found",
                "model",
            )
        if body.n > engine.max_batch:
            raise APIError(400, f"n must be <= {engine.max_batch}", "invalid_value", "n")
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        messages = to_messages(body.messages)
        try:
            prompt = await run_in_threadpool(engine.encode, messages, request_id)
            room = engine.max_model_len - len(prompt.input_ids)
            max_tokens = (
                body.max_completion_tokens or body.max_tokens or max(1, min(default_max_tokens, room))
            )
            params = SamplingParams(max_tokens, body.temperature, body.top_p, _stops(body.stop))
            engine.check(prompt, params)
        except RequestError as e:
            raise APIError(e.status, str(e), e.code) from None
        rows = [Row(prompt, params)] * body.n
        created = int(time.time())
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return _stream(scheduler, rows, request_id, created, model_name, include_usage)
        try:
            future = scheduler.submit(rows)
        except QueueFull as e:
            return _error(503, str(e), "queue_full", headers={"Retry-After": "1"})
        try:
            results = await asyncio.wrap_future(future)
        except Exception as e:  # noqa: BLE001 — generation failed: a 500, the server stays up
            return _error(500, f"generation failed: {type(e).__name__}: {e}", "generation_failed")
        return {
            "id": request_id,
            "object": "chat.completion",
            "created": created,
            "model": model_name,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": r.text},
                    "logprobs": None,
                    "finish_reason": r.finish_reason,
                }
                for i, r in enumerate(results)
            ],
            "usage": _usage(results),
        }

    return app


def _usage(results) -> dict[str, int]:
    prompt = results[0].prompt_tokens
    completion = sum(r.num_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _stream(scheduler: Scheduler, rows, request_id: str, created: int, model: str, include_usage: bool):
    """A `text/event-stream` response: a role chunk per choice, text deltas as decoded, a final
    chunk per choice with its finish reason, the usage when asked, then `[DONE]`."""
    loop = asyncio.get_running_loop()
    deltas: asyncio.Queue[tuple[int, str]] = asyncio.Queue()

    def on_text(row: int, text: str) -> None:
        loop.call_soon_threadsafe(deltas.put_nowait, (row, text))

    try:
        future = asyncio.wrap_future(scheduler.submit(rows, on_text))
    except QueueFull as e:
        return _error(503, str(e), "queue_full", headers={"Retry-After": "1"})

    def chunk(choices: list[dict[str, Any]], usage: dict | None = None) -> str:
        body: dict[str, Any] = {
            "id": request_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": choices,
        }
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def delta(row: int, content: str) -> str:
        return chunk([{"index": row, "delta": {"content": content}, "finish_reason": None}])

    async def events() -> AsyncIterator[str]:
        for i in range(len(rows)):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        while not future.done():
            getter = asyncio.ensure_future(deltas.get())
            await asyncio.wait({getter, future}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield delta(*getter.result())
            else:
                getter.cancel()
        while not deltas.empty():
            yield delta(*deltas.get_nowait())
        try:
            results = future.result()
        except Exception as e:  # noqa: BLE001 — headers are sent: report in the stream
            error = {"message": f"generation failed: {type(e).__name__}: {e}", "type": "server_error"}
            yield f"data: {json.dumps({'error': error})}\n\n"
            return
        for i, r in enumerate(results):
            yield chunk([{"index": i, "delta": {}, "finish_reason": r.finish_reason}])
        if include_usage:
            yield chunk([], _usage(results))
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")

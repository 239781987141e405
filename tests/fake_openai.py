"""A scripted OpenAI-compatible chat server on 127.0.0.1 for tests (stdlib only, in a thread).

    with FakeOpenAI([Reply('{"a": 1}'), Reply(status=500), Reply("<think>hm</think>ok")]) as server:
        client = LLMClient(server.url, "fake")
        ...
        assert server.count == 3

The script is either a list of `Reply`s served in arrival order (the last one repeats when the list
runs out), or a function `request_json -> Reply` (deterministic under concurrency: answer by
prompt). A `Reply` can be valid or malformed JSON, `<think>`-prefixed, repetitive, language-mixed
(any text), slow (`delay_s`, to trigger client timeouts), or an HTTP error (`status`, e.g. 500 or
429 with `retry_after`). The server records every request body (`requests`) and counts them
(`count`; `headers`, lower-cased, too), including the ones answered with an error.

A client in another process (a kill-and-rerun test) reaches the same server through `url`.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclasses.dataclass(frozen=True)
class Reply:
    content: str = ""
    status: int = 200
    delay_s: float = 0.0
    finish_reason: str = "stop"
    reasoning_content: str | None = None  # a server-side reasoning field (DeepSeek / vLLM style)
    retry_after: float | None = None


Script = Sequence[Reply] | Callable[[dict[str, Any]], Reply]


class FakeOpenAI:
    """The server; `url` is the base URL to give a client (`http://127.0.0.1:PORT/v1`)."""

    def __init__(self, script: Script):
        self.script = script
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self._next = 0
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.requests)

    def _reply_for(self, body: dict[str, Any], headers: dict[str, str]) -> Reply:
        with self._lock:
            self.requests.append(body)
            self.headers.append(headers)
            if not callable(self.script):
                reply = self.script[min(self._next, len(self.script) - 1)]
                self._next += 1
                return reply
        return self.script(body)  # outside the lock: concurrent requests are answered concurrently

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _send(
                self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None
            ) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

            def do_GET(self) -> None:
                if self.path.rstrip("/").endswith("/models"):
                    self._send(200, {"object": "list", "data": [{"id": "fake", "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                reply = server._reply_for(body, {k.lower(): v for k, v in self.headers.items()})
                if reply.delay_s:
                    time.sleep(reply.delay_s)
                if reply.status != 200:
                    headers = {"Retry-After": str(reply.retry_after)} if reply.retry_after is not None else {}
                    self._send(reply.status, {"error": {"message": f"scripted {reply.status}"}}, headers)
                    return
                message: dict[str, Any] = {"role": "assistant", "content": reply.content}
                if reply.reasoning_content is not None:
                    message["reasoning_content"] = reply.reasoning_content
                prompt_chars = sum(len(str(m.get("content", ""))) for m in body.get("messages", []))
                self._send(
                    200,
                    {
                        "id": f"chatcmpl-{server.count}",
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": body.get("model", "fake"),
                        "choices": [{"index": 0, "message": message, "finish_reason": reply.finish_reason}],
                        "usage": {
                            "prompt_tokens": prompt_chars // 4,
                            "completion_tokens": len(reply.content) // 4,
                            "total_tokens": prompt_chars // 4 + len(reply.content) // 4,
                        },
                    },
                )

        return Handler

    def start(self) -> FakeOpenAI:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

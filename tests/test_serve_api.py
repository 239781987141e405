"""The HTTP layer and the batcher of `pathor1 serve` over a scripted engine (no model): a full queue
answers 503, a failing batch fails only its requests, streaming sends the engine's text as it comes,
and stop strings are held back until they cannot be one."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from pathor1_jax.serve.app import create_app  # noqa: E402
from pathor1_jax.serve.engine import EncodedPrompt, Engine, RowResult, holdback  # noqa: E402
from pathor1_jax.serve.scheduler import Scheduler  # noqa: E402


class ScriptedEngine:
    """Stands in for `Engine`: each batch waits for `gate`, then fails or answers every row."""

    max_batch = 4
    max_model_len = 64
    mesh = None

    def __init__(self):
        self.gate = threading.Event()
        self.batches: list[int] = []
        self.fail = False

    def encode(self, messages, request_id="r"):
        return EncodedPrompt(np.arange(len(str(messages[-1].content)), dtype=np.int32))

    check = Engine.check

    def run(self, rows, on_text=None):
        self.batches.append(len(rows))
        assert self.gate.wait(timeout=30)
        if self.fail:
            self.fail = False
            raise RuntimeError("device lost")
        for i in range(len(rows)):
            for piece in ("hel", "lo"):
                if on_text is not None:
                    on_text(i, piece)
        return [RowResult("hello", (1, 2), 2, "stop", len(r.prompt.input_ids)) for r in rows]

    def stats(self):
        return {"compiled_shapes": 0}


@pytest.fixture
def served():
    engine = ScriptedEngine()
    scheduler = Scheduler(engine, max_queue=1, batch_wait_s=0.0).start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(scheduler, "m"), port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield engine, scheduler, f"http://127.0.0.1:{port}"
    engine.gate.set()
    server.should_exit = True
    thread.join(timeout=10)
    scheduler.stop()


def post(url: str, body: dict) -> tuple[int, dict, dict]:
    request = urllib.request.Request(
        f"{url}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def _until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_full_queue_answers_503_and_the_queued_requests_still_complete(served):
    engine, scheduler, url = served
    results = []
    threads = [threading.Thread(target=lambda: results.append(post(url, BODY))) for _ in range(2)]
    threads[0].start()
    _until(lambda: engine.batches == [1])  # the first request is generating
    threads[1].start()
    _until(lambda: scheduler.queued() == 1)  # the second waits in the queue of one
    status, headers, body = post(url, BODY)
    assert status == 503 and headers["retry-after"] == "1"
    assert body["error"]["code"] == "queue_full" and body["error"]["type"] == "overloaded_error"
    engine.gate.set()
    for t in threads:
        t.join(timeout=30)
    assert sorted(r[0] for r in results) == [200, 200]
    assert scheduler.stats()["rejected_queue_full"] == 1


def test_a_failing_batch_fails_its_requests_only(served):
    engine, scheduler, url = served
    engine.gate.set()
    engine.fail = True
    status, _, body = post(url, BODY)
    assert (
        status == 500
        and body["error"]["code"] == "generation_failed"
        and "device lost" in body["error"]["message"]
    )
    status, _, body = post(url, {**BODY, "n": 2})
    assert status == 200 and [c["message"]["content"] for c in body["choices"]] == ["hello", "hello"]
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}
    stats = scheduler.stats()
    assert stats["failed_batches"] == 1 and stats["batch_rows"] == {"2": 1}


def test_streaming_sends_text_as_the_engine_makes_it(served):
    engine, _, url = served
    engine.gate.set()
    request = urllib.request.Request(
        f"{url}/v1/chat/completions",
        json.dumps({**BODY, "stream": True, "stream_options": {"include_usage": True}}).encode(),
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: ") :] for line in r.read().decode().split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["choices"][0]["delta"] for c in chunks[:4]] == [
        {"role": "assistant", "content": ""},
        {"content": "hel"},
        {"content": "lo"},
        {},
    ]
    assert chunks[3]["choices"][0]["finish_reason"] == "stop"
    assert chunks[4]["choices"] == [] and chunks[4]["usage"]["completion_tokens"] == 2


def test_stop_strings_are_held_back_while_they_may_be_starting():
    assert holdback("the answer </an", ("</answer>",)) == 4
    assert holdback("the answer <", ("</answer>", "<|")) == 1
    assert holdback("done.", ("</answer>",)) == 0
    assert holdback("broken \ufffd", ()) == 1


def _error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_serve_and_eval_vlm_bad_flags_are_one_line_errors(tmp_path, capsys):
    from pathor1_jax.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        assert main(["serve", "--model", str(tmp_path), "--port", port]) == 2
        assert "cannot listen there" in _error_line(capsys)
    assert main(["serve", "--model", str(tmp_path), "--port", "0", "--warmup", "512"]) == 2
    assert "expected PROMPT_TOKENS:MAX_TOKENS" in _error_line(capsys)
    assert main(["serve", "--model", str(tmp_path), "--port", "0", "--warmup", "8000:2048"]) == 2
    assert "fit --max-model-len 8192" in _error_line(capsys)
    assert main(["serve", "--model", str(tmp_path), "--port", "0", "--max-batch", "0"]) == 2
    assert _error_line(capsys).endswith("--max-batch must be >= 1, got 0")
    assert main(["serve", "--model", str(tmp_path), "--port", "0"]) == 2
    assert "neither an HF checkpoint" in _error_line(capsys)
    out = ["--out", str(tmp_path / "out")]
    assert main(["eval", "vlm", "--data", "demo", *out]) == 2
    assert "exactly one of --model" in _error_line(capsys)
    assert main(["eval", "vlm", "--url", "http://x/v1", "--data", "demo", "--prompt-style", "cot", *out]) == 2
    assert "--prompt-style: unknown ['cot']" in _error_line(capsys)
    assert main(["eval", "vlm", "--url", "http://x/v1", "--data", str(tmp_path / "no.jsonl"), *out]) == 2
    assert _error_line(capsys).endswith("no.jsonl: No such file or directory")
    assert (
        main(["eval", "vlm", "--url", "http://x/v1", "--data", "demo", "--judge-url", "http://j", *out]) == 2
    )
    assert "go together" in _error_line(capsys)

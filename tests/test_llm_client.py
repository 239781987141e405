"""The shared OpenAI-compatible client against the scripted fake server: retries, cache, reasoning, JSON."""

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

from pathor1_jax.data.llm import (  # noqa: E402
    LLMClient,
    LLMError,
    LLMJSONError,
    Request,
    ResponseCache,
    parse_json,
    request_key,
    strip_think,
)

MSG = [{"role": "user", "content": "Describe the figure."}]


def client_for(server: FakeOpenAI, tmp_path, **kw) -> LLMClient:
    kw.setdefault("backoff_s", 0.01)
    kw.setdefault("cache", tmp_path / "cache.jsonl")
    return LLMClient(server.url, "fake-r1", **kw)


def test_strip_think_variants():
    assert strip_think('<think>step 1\nstep 2</think>\n{"a": 1}') == ('{"a": 1}', "step 1\nstep 2")
    assert strip_think("reasoning without opening tag</think>answer") == (
        "answer",
        "reasoning without opening tag",
    )
    assert strip_think("<think>ran out of tokens") == ("", "ran out of tokens")
    assert strip_think("plain") == ("plain", "")


def test_parse_json_strict_with_clear_errors():
    assert parse_json('<think>x</think>```json\n{"q": [1, 2]}\n```') == {"q": [1, 2]}
    assert parse_json(" [1, 2] ") == [1, 2]
    with pytest.raises(LLMJSONError, match=r"rec-7: reply is not valid JSON: Expecting .* line 1 column"):
        parse_json('{"q": 1,}', where="rec-7")
    with pytest.raises(LLMJSONError, match="rec-8: reply is not valid JSON"):
        parse_json('Sure! Here it is: {"q": 1}', where="rec-8")
    with pytest.raises(LLMJSONError, match="rec-9: empty reply"):
        parse_json("<think>only thoughts</think>", where="rec-9")


def test_request_key_covers_model_messages_params_only():
    k = request_key("m", MSG, {"temperature": 0.0})
    assert k == request_key("m", [dict(MSG[0])], {"temperature": 0.0})
    assert (
        len(
            {
                k,
                request_key("m2", MSG, {"temperature": 0.0}),
                request_key("m", MSG, {"temperature": 0.5}),
                request_key("m", [{"role": "user", "content": "x"}], {"temperature": 0.0}),
            }
        )
        == 4
    )


def test_complete_strips_reasoning_and_reports_usage(tmp_path):
    with FakeOpenAI(
        [Reply('<think>Look at the nuclei.</think>{"answer": "B"}', reasoning_content="server")]
    ) as s:
        reply = client_for(s, tmp_path).complete(MSG, temperature=0.0)
        assert s.requests[0]["model"] == "fake-r1" and s.requests[0]["temperature"] == 0.0
    assert reply.content == '{"answer": "B"}'
    assert reply.reasoning == "server\nLook at the nuclei."
    assert reply.finish_reason == "stop" and reply.usage["completion_tokens"] > 0 and not reply.cached


def test_retries_5xx_429_and_timeouts_then_succeeds(tmp_path):
    script = [
        Reply(status=500),
        Reply(status=503),
        Reply(status=429, retry_after=0.01),
        Reply("late", delay_s=1.0),
        Reply("ok"),
    ]
    with FakeOpenAI(script) as s:
        client = client_for(s, tmp_path, max_retries=4, timeout_s=0.3)
        reply = client.complete(MSG)
        assert s.count == 5
    assert reply.content == "ok" and client.stats["retries"] == 4 and client.stats["failures"] == 0


def test_gives_up_after_max_retries_and_fails_fast_on_4xx(tmp_path):
    with FakeOpenAI([Reply(status=500)]) as s:
        with pytest.raises(
            LLMError, match=r"model 'fake-r1': request failed after 3 attempt\(s\): InternalServerError"
        ):
            client_for(s, tmp_path, max_retries=2).complete(MSG)
        assert s.count == 3
    with FakeOpenAI([Reply(status=400)]) as s:
        with pytest.raises(LLMError, match=r"after 1 attempt\(s\): BadRequestError"):
            client_for(s, tmp_path / "b", max_retries=5).complete(MSG)
        assert s.count == 1


def test_api_key_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_LLM_KEY", "sk-test-123")
    with FakeOpenAI([Reply("ok")]) as s:
        client_for(s, tmp_path, api_key_env="MY_LLM_KEY").complete(MSG)
        assert s.headers[0]["authorization"] == "Bearer sk-test-123"
    assert "sk-test-123" not in (tmp_path / "cache.jsonl").read_text()
    monkeypatch.delenv("MY_LLM_KEY")
    with FakeOpenAI([Reply("ok")]) as s:  # unset: a keyless local server
        client_for(s, tmp_path / "k", api_key_env="MY_LLM_KEY").complete(MSG)
        assert s.headers[0]["authorization"] == "Bearer EMPTY"


def test_map_bounds_concurrency_keeps_order_and_isolates_failures(tmp_path):
    import threading

    live, peak, lock = [0], [0], threading.Lock()

    def script(body):
        text = body["messages"][0]["content"]
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        time.sleep(0.05)
        with lock:
            live[0] -= 1
        return Reply(status=400) if text == "q3" else Reply(f"a-{text}")

    with FakeOpenAI(script) as s:
        client = client_for(s, tmp_path, max_concurrency=3)
        out = client.map([Request([{"role": "user", "content": f"q{i}"}]) for i in range(10)])
    assert peak[0] == 3
    assert isinstance(out[3], LLMError)
    assert [o.content for i, o in enumerate(out) if i != 3] == [f"a-q{i}" for i in range(10) if i != 3]


def test_rerun_is_served_from_cache(tmp_path):
    with FakeOpenAI(lambda body: Reply("x-" + body["messages"][0]["content"])) as s:
        with client_for(s, tmp_path) as c:
            c.map([Request([{"role": "user", "content": f"q{i}"}]) for i in range(4)])
        with client_for(s, tmp_path) as c:
            out = c.map([Request([{"role": "user", "content": f"q{i}"}]) for i in range(6)])
        assert s.count == 6  # 4 + the 2 new ones
    assert [o.cached for o in out] == [True] * 4 + [False] * 2
    assert out[0].content == "x-q0"


def test_cache_drops_a_torn_last_line_and_rejects_corruption_elsewhere(tmp_path):
    path = tmp_path / "c.jsonl"
    cache = ResponseCache(path)
    cache.put("k1", {"text": "a", "finish_reason": "stop", "usage": {}})
    cache.put("k2", {"text": "b", "finish_reason": "stop", "usage": {}})
    cache.close()
    with open(path, "ab") as f:
        f.write(b'{"key": "k3", "text": "tor')
    with pytest.warns(UserWarning, match=r"dropped a torn last line \(\d+ bytes\)"):
        again = ResponseCache(path)
    assert len(again) == 2 and again.get("k2")["text"] == "b"
    again.put("k4", {"text": "d", "finish_reason": "stop", "usage": {}})
    again.close()
    assert [json.loads(line)["key"] for line in path.read_text().splitlines()] == ["k1", "k2", "k4"]
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"c.jsonl:2: corrupt cache line"):
        ResponseCache(path)


KILLED_CLIENT = textwrap.dedent("""
    import sys
    from pathor1_jax.data.llm import LLMClient, Request
    client = LLMClient(sys.argv[1], "fake-r1", cache=sys.argv[2], max_concurrency=2)
    out = client.map([Request([{"role": "user", "content": f"q{i}"}]) for i in range(20)])
    print(sum(not o.cached for o in out))
""")


def test_kill_9_mid_run_then_rerun_pays_for_no_request_twice(tmp_path):
    cache = tmp_path / "cache.jsonl"
    with FakeOpenAI(lambda body: Reply("a-" + body["messages"][0]["content"], delay_s=0.1)) as s:
        proc = subprocess.Popen(
            [sys.executable, "-c", KILLED_CLIENT, s.url, str(cache)],
            env={**os.environ, "PYTHONPATH": os.getcwd()},
            stdout=subprocess.PIPE,
        )
        deadline = time.monotonic() + 60
        while s.count < 8 and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        # a torn last line may or may not be there; append one to be sure the rerun copes
        with open(cache, "ab") as f:
            f.write(b'{"key": "dead')
        first = s.count
        done = sum(1 for line in cache.read_text().splitlines() if line.endswith("}"))
        assert 0 < done < 20
        out = subprocess.run(
            [sys.executable, "-c", KILLED_CLIENT, s.url, str(cache)],
            capture_output=True,
            text=True,
            check=True,
        )
        new_requests = s.count - first
    assert "dropped a torn last line" in out.stderr
    assert int(out.stdout) == new_requests == 20 - done

"""`pathor1 serve` as a real process on a free port, called by the official `openai` client, and
`pathor1 eval vlm` through it: greedy text equal to in-process `generate`, batching of concurrent
clients, streaming / n / stop, 4xx for every bad request while serving goes on.

One server process (tiny 1-layer model) is shared by the whole module. It sees 8 fake CPU devices
and shards the model over them (FSDP rules, each batch split 8 ways), so "equal to in-process
`generate`" also means "sharded serving equals one device".
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
from tiny_vlm import make_checkpoint, png_bytes  # noqa: E402

from pathor1_jax.cli import main  # noqa: E402
from pathor1_jax.data.records import ChatRecord, ImagePart, ImageRef, Message, TextPart  # noqa: E402
from pathor1_jax.models import qwen2_5_vl  # noqa: E402
from pathor1_jax.train.loading import load_for_inference  # noqa: E402

MAX_TOKENS = 8
NAME = "tiny"


def http(url: str, body: bytes | None = None) -> tuple[int, dict]:
    """(status, JSON body) of a GET, or of a POST of `body`."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("serve") / NAME)


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    port = _free_port()
    log_path = tmp_path_factory.mktemp("serve_log") / "server.log"
    flags = {"--model": str(checkpoint), "--port": str(port), "--max-batch": "8", "--max-model-len": "256",
             "--batch-wait-ms": "100", "--mesh": "fsdp=-1", "--sharding": "fsdp",
             "--warmup": "60:8"}  # fmt: skip
    command = [sys.executable, "-m", "pathor1_jax.cli", "serve", *[x for kv in flags.items() for x in kv]]
    xla_flags = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags, "NPROC": "16"}  # see multidevice.py
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"pathor1 serve did not come up:\n{log_path.read_text()[-3000:]}")
        try:
            if http(f"{url}/health")[0] == 200:
                break
        except OSError:
            time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=60)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def local(checkpoint):
    return load_for_inference(checkpoint)


def in_process(local, messages: tuple[Message, ...]) -> tuple[str, int, int]:
    """Greedy text, generated tokens (EOS included) and prompt tokens of `qwen2_5_vl.generate`."""
    model, processor = local
    prompt = processor.encode_prompt(ChatRecord(id="ref", messages=messages))
    images = len(prompt["image_grid_thw"]) > 0
    tokens = qwen2_5_vl.generate(
        model,
        prompt["input_ids"][None],
        None,
        prompt["pixel_values"] if images else None,
        prompt["image_grid_thw"] if images else None,
        max_new_tokens=MAX_TOKENS,
    )
    tokens = np.asarray(tokens[0]).tolist()
    eos = model.config.text.eos_token_id
    kept = tokens[: tokens.index(eos)] if eos in tokens else tokens
    n = len(kept) + (eos in tokens)
    return processor.tokenizer.decode(kept, skip_special_tokens=True), n, len(prompt["input_ids"])


def _data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    health = http(f"{server}/health")[1]
    assert health["status"] == "ok" and health["model"] == NAME and health["devices"] == 8
    assert (
        health["engine_compiled_shapes"] == 1 and health["engine_batches"] == 2
    )  # --warmup: 8 rows, 2 modes


def test_text_and_image_greedy_equal_in_process_generate(client, local):
    image = png_bytes(3)
    cases = [
        ([{"role": "user", "content": "Describe a gland."}], (Message("user", "Describe a gland."),)),
        (
            [{"role": "system", "content": "You are a pathologist."},
             {"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_uri(image)}},
                                          {"type": "text", "text": "What stain is this?"}]}],
            (Message("system", "You are a pathologist."),
             Message("user", (ImagePart(ImageRef(data=image)), TextPart("What stain is this?")))),
        ),
    ]  # fmt: skip
    for openai_messages, ours in cases:
        reply = client.chat.completions.create(model=NAME, messages=openai_messages, max_tokens=MAX_TOKENS,
                                               temperature=0)  # fmt: skip
        text, num_tokens, prompt_tokens = in_process(local, ours)
        assert reply.choices[0].message.content == text and text
        assert reply.usage.completion_tokens == num_tokens
        assert reply.usage.prompt_tokens == prompt_tokens
        assert reply.choices[0].finish_reason == ("length" if num_tokens == MAX_TOKENS else "stop")


def test_stream_n_and_stop(client):
    messages = [{"role": "user", "content": "Name a stain."}]
    full = client.chat.completions.create(model=NAME, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    text = full.choices[0].message.content
    stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=MAX_TOKENS,
                                            temperature=0, n=2, stream=True,
                                            stream_options={"include_usage": True})  # fmt: skip
    pieces: dict[int, str] = {0: "", 1: ""}
    finish, usage = {}, None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            pieces[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert pieces == {0: text, 1: text}
    assert finish == {0: full.choices[0].finish_reason, 1: full.choices[0].finish_reason}
    assert usage.completion_tokens == 2 * full.usage.completion_tokens
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = client.chat.completions.create(model=NAME, messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                         stop=[stop])  # fmt: skip
    assert cut.choices[0].message.content == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens <= full.usage.completion_tokens


def test_concurrent_clients_are_batched_and_all_answered(server, client):
    prompts = [f"Question {i}: which organ is {'very ' * i}likely?" for i in range(4)]
    before = http(f"{server}/health")[1]
    barrier = threading.Barrier(len(prompts))
    answers: dict[int, str] = {}

    def ask(i: int) -> None:
        barrier.wait()
        reply = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": prompts[i]}],
                                               max_tokens=MAX_TOKENS, temperature=0)  # fmt: skip
        answers[i] = reply.choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sorted(answers) == list(range(len(prompts)))
    health = http(f"{server}/health")[1]
    assert health["requests"] - before["requests"] == len(prompts)
    assert health["batches"] - before["batches"] < len(prompts)  # some requests shared a batch
    assert health["max_batch_rows"] > 1
    for i, prompt in enumerate(prompts[:2]):  # batched greedy text = the text of the request alone
        alone = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": prompt}],
                                               max_tokens=MAX_TOKENS, temperature=0)  # fmt: skip
        assert alone.choices[0].message.content == answers[i]


BAD_REQUESTS = [
    (b"{not json", 400, "invalid_body"),
    ({"model": NAME}, 400, "invalid_body"),  # no messages
    ({"model": NAME, "messages": [{"role": "robot", "content": "x"}]}, 400, "invalid_body"),
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, 404, "model_not_found"),
    ({"model": NAME, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _data_uri(b"not an image")}}]}]}, 400, "invalid_image"),
    ({"model": NAME, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]}, 400, "invalid_image"),
    ({"model": NAME, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.org/x.png"}}]}]}, 400, "invalid_image"),
    ({"model": NAME, "messages": [{"role": "user", "content": "word " * 400}]}, 400,
     "context_length_exceeded"),
    ({"model": NAME, "messages": [{"role": "user", "content": "x"}], "max_tokens": 300}, 400,
     "context_length_exceeded"),
    ({"model": NAME, "messages": [{"role": "user", "content": "x"}], "temperature": 3}, 400, "invalid_body"),
    ({"model": NAME, "messages": [{"role": "user", "content": "x"}], "n": 9}, 400, "invalid_value"),
    ({"model": NAME, "messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}, 400,
     "invalid_value"),
]  # fmt: skip


def test_bad_requests_get_4xx_json_and_serving_goes_on(server, client):
    for body, status, code in BAD_REQUESTS:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        got, reply = http(f"{server}/v1/chat/completions", data)
        assert (got, reply["error"]["code"]) == (status, code), (body, reply)
        assert reply["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "word " * 400}])
    reply = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Still there?"}],
                                           max_tokens=2, temperature=0)  # fmt: skip
    assert reply.choices[0].finish_reason in ("length", "stop")
    assert http(f"{server}/health")[1]["status"] == "ok"


def test_eval_vlm_through_url_equals_in_process(server, checkpoint, tmp_path, capsys):
    image = {"bytes_b64": base64.b64encode(png_bytes(5)).decode()}
    mcq = [
        {
            "id": "m1",
            "image": image,
            "question": "Which stain?",
            "options": {"A": "H&E", "B": "IHC"},
            "answer": "B",
            "benchmark": "PathMMU",
            "category": "Atlas",
            "split": "val",
        },
        {
            "id": "m2",
            "question": "Which organ has crypts?",
            "options": {"A": "Colon", "B": "Skin", "C": "Lung"},
            "answer": "A",
            "benchmark": "PathMMU",
            "category": "PubMed",
            "split": "val",
        },
    ]
    vqa = [
        {"id": "y1", "image": image, "question": "Is this IHC?", "answer": "no", "answer_type": "yes_no",
         "benchmark": "PathVQA"},
        {"id": "o1", "image": image, "question": "What is shown?", "answer": "A gland", "answer_type": "open",
         "benchmark": "PathVQA"},
    ]  # fmt: skip
    (tmp_path / "mcq.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mcq))
    (tmp_path / "vqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in vqa))
    data = f"{tmp_path / 'mcq.jsonl'},{tmp_path / 'vqa.jsonl'}"
    common = ["--data", data, "--max-new-tokens", str(MAX_TOKENS), "--prompt-style", "patho_r1"]
    assert main(["eval", "vlm", "--url", f"{server}/v1", "--out", str(tmp_path / "url"), *common]) == 0
    assert main(["eval", "vlm", "--model", str(checkpoint), "--max-model-len", "256", "--out",
                 str(tmp_path / "local"), *common]) == 0  # fmt: skip
    capsys.readouterr()

    def predictions(name):
        lines = (tmp_path / name / "predictions.jsonl").read_text().splitlines()
        return sorted((p["id"], p["response"], p["extracted"], p["correct"]) for p in map(json.loads, lines))

    assert predictions("url") == predictions("local")
    assert len(predictions("url")) == 4
    for name in ("report.md", "report.json", "report.csv", "report.png"):
        assert (tmp_path / "url" / name).stat().st_size > 0

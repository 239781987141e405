"""Serving throughput: `pathor1 serve` at 1, 8 and 32 concurrent clients, against batched generation
in process (the same engine without HTTP) and Hugging Face `generate` (torch), on the same tiny model.

Every request is a text chat of under 64 tokens (one prompt bucket), greedy, `--new-tokens` new
tokens (the random tiny model practically never emits EOS; HF runs with `min_new_tokens` so that it
never stops early).
Clients are threads with the official `openai` client, each sending `--requests` requests one after
another; the server is a `pathor1 serve` process on a free port (1 device, `--max-batch 32`).
Generated tokens/s = completion tokens / wall time; latency = per request (server) or per batch (in
process, HF). Compilation is excluded: the server starts with `--warmup` (every batch size compiled),
every concurrency level and batch size runs once untimed first.

Usage: python bench/serve.py [--new-tokens 32] [--requests 4] [--layers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_vlm import make_checkpoint  # noqa: E402

from pathor1_jax.data.records import Message  # noqa: E402
from pathor1_jax.serve.engine import Engine, Row, SamplingParams  # noqa: E402
from pathor1_jax.train.loading import load_for_inference  # noqa: E402

LEVELS = (1, 8, 32)
WORDS = "gland stroma nucleus mitosis crypt villus necrosis fibrosis lymphocyte keratin".split()


def prompts(n: int) -> list[str]:
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(8, 16)))) + "?" for _ in range(n)]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def start_server(checkpoint: Path, log: Path, new_tokens: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flags = ["--port", str(port), "--max-batch", "32", "--max-model-len", "512", "--batch-wait-ms", "5",
             "--warmup", f"64:{new_tokens}"]  # fmt: skip
    command = [sys.executable, "-m", "pathor1_jax.cli", "serve", "--model", str(checkpoint), *flags]
    with open(log, "w") as f:
        proc = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"pathor1 serve exited:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.5)


def run_clients(url: str, name: str, texts: list[str], clients: int, per_client: int, new_tokens: int):
    """(generated tokens, wall seconds, per-request latencies) of `clients` threads."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def one(c: int) -> None:
        barrier.wait()
        for r in range(per_client):
            text = texts[(c * per_client + r) % len(texts)]
            start = time.perf_counter()
            reply = client.chat.completions.create(model=name, messages=[{"role": "user", "content": text}],
                                                   max_tokens=new_tokens, temperature=0)  # fmt: skip
            with lock:
                latencies.append(time.perf_counter() - start)
                tokens[0] += reply.usage.completion_tokens

    threads = [threading.Thread(target=one, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return tokens[0], time.perf_counter() - start, latencies


def in_process(engine: Engine, texts: list[str], batch: int, new_tokens: int, repeats: int):
    rows = [Row(engine.encode((Message("user", t),)), SamplingParams(new_tokens)) for t in texts[:batch]]
    engine.run(rows)  # compile
    times, tokens = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        results = engine.run(rows)
        times.append(time.perf_counter() - start)
        tokens += sum(r.num_tokens for r in results)
    return tokens, sum(times), times


def hf_generate(
    checkpoint: Path, engine: Engine, texts: list[str], batch: int, new_tokens: int, repeats: int
):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    encoded = [engine.encode((Message("user", t),)).input_ids for t in texts[:batch]]
    width = max(len(e) for e in encoded)
    pad = engine.pad
    ids = torch.tensor([[pad] * (width - len(e)) + e.tolist() for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])

    def generate():
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)  # fmt: skip

    generate()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        generate()
        times.append(time.perf_counter() - start)
    return batch * new_tokens * repeats, sum(times), times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=4, help="requests per client (server)")
    parser.add_argument("--repeats", type=int, default=3, help="timed batches (in process, HF)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the tiny model")
    args = parser.parse_args()
    texts = prompts(64)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_checkpoint(Path(tmp) / "tiny", num_hidden_layers=args.layers)
        proc, url = start_server(checkpoint, Path(tmp) / "server.log", args.new_tokens)
        try:
            for clients in LEVELS:
                run_clients(url, "tiny", texts, clients, args.requests, args.new_tokens)  # warm-up
                tokens, wall, lat = run_clients(url, "tiny", texts, clients, args.requests, args.new_tokens)
                rows.append(("pathor1 serve (HTTP)", clients, len(lat), tokens / wall, lat))
            with urllib.request.urlopen(f"{url}/health") as r:
                health = json.loads(r.read())
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        model, processor = load_for_inference(checkpoint)
        engine = Engine(model, processor, max_batch=32)
        for batch in LEVELS:
            tokens, wall, times = in_process(engine, texts, batch, args.new_tokens, args.repeats)
            rows.append(("in-process engine", batch, batch * args.repeats, tokens / wall, times))
        for batch in LEVELS:
            tokens, wall, times = hf_generate(checkpoint, engine, texts, batch, args.new_tokens, args.repeats)
            rows.append(("HF generate (torch)", batch, batch * args.repeats, tokens / wall, times))
    hf = {n: tps for name, n, _, tps, _ in rows if name.startswith("HF")}
    print(f"tiny Qwen2.5-VL ({args.layers} layers), {args.new_tokens} new tokens, greedy; "
          f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} (shared machine)")  # fmt: skip
    print(f"server batches: rows per batch -> count {health['batch_rows']}")
    print()
    header = ["engine", "clients / batch", "requests", "generated tok/s", "vs HF (same batch)"]
    header += ["p50 latency s", "p99 latency s"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, n, requests, tps, lat in rows:
        cells = [name, n, requests, f"{tps:.1f}", f"{tps / hf[n]:.2f}x", f"{statistics.median(lat):.3f}",
                 f"{percentile(lat, 99):.3f}"]  # fmt: skip
        print("| " + " | ".join(map(str, cells)) + " |")


if __name__ == "__main__":
    main()

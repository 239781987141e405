"""`pathor1 serve --model RUN_OR_HF_DIR [--host H --port P]`: an OpenAI-compatible chat server.

    pathor1 serve --model runs/sft --port 8000
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"model": "sft", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32}'

Requests arriving together are generated as one batch (`pathor1_jax.serve`); the API is described
in `pathor1_jax.serve.app`. Needs the `serve` extra (fastapi, uvicorn).
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from pathlib import Path

from pathor1_jax.errors import UserError
from pathor1_jax.serve.loading import add_model_arguments, engine_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--served-model-name", default="", help="the `model` clients name (default: the folder)"
    )
    parser.add_argument("--max-queue", type=int, default=256, help="waiting requests before 503s")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a batch waits to fill")
    parser.add_argument(
        "--default-max-tokens", type=int, default=2048, help="max_tokens when a request omits it"
    )
    parser.add_argument(
        "--warmup",
        default="",
        metavar="PROMPT_TOKENS:MAX_TOKENS",
        help="before serving, compile every batch size for text prompts up to this size, e.g. 512:2048",
    )


def check_port(host: str, port: int) -> None:
    """Fail at start-up, before loading the model, when the address cannot be served."""
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise UserError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None


def parse_warmup(text: str, max_model_len: int) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        prompt, new = (int(x) for x in text.split(":"))
    except ValueError:
        raise UserError(f"--warmup {text}: expected PROMPT_TOKENS:MAX_TOKENS, e.g. 512:2048") from None
    if prompt < 1 or new < 1 or prompt + new > max_model_len:
        raise UserError(f"--warmup {text}: sizes must be >= 1 and fit --max-model-len {max_model_len}")
    return prompt, new


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from pathor1_jax.serve.app import create_app
    except ImportError as e:
        raise UserError(f"{e}: install the serve extra (pip install 'pathor1_jax[serve]')") from None
    from pathor1_jax.serve.scheduler import Scheduler

    check_port(args.host, args.port)
    warmup = parse_warmup(args.warmup, args.max_model_len)
    engine = engine_from_args(args)
    if warmup:
        start = time.perf_counter()
        batches = engine.warmup(*warmup)
        print(
            f"pathor1 serve: warmed up {batches} batch shapes in {time.perf_counter() - start:.0f} s",
            file=sys.stderr,
        )
    name = args.served_model_name or Path(args.model).resolve().name
    scheduler = Scheduler(engine, max_queue=args.max_queue, batch_wait_s=args.batch_wait_ms / 1000).start()
    app = create_app(scheduler, name, default_max_tokens=args.default_max_tokens)
    print(f"pathor1 serve: {name} on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        scheduler.stop()
    return 0

"""Serving and batched inference: the generation engine, the request batcher, the OpenAI-compatible API.

- `engine`: `Engine` (encode chats, generate batches of rows with bucketed shapes, stream, stop).
- `scheduler`: `Scheduler` (a bounded queue; requests arriving together run as one batch).
- `app`: `create_app` (FastAPI: /v1/chat/completions, /v1/models, /health), needs the `serve` extra.
- `loading`: the `--model` / `--mesh` / `--sharding` / `--dtype` options and `engine_from_args`.
"""

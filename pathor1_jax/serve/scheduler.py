"""Requests that arrive together become one batch: a bounded queue and one generation thread.

`submit(rows)` queues a request's rows and returns a `Future` of their `RowResult`s at once; a full
queue raises `QueueFull` (the server answers 503). The worker thread takes the oldest request, waits
up to `batch_wait_s` for more (the first request of an idle server is not delayed longer than
that), packs whole requests up to `engine.max_batch` rows, and runs them as one `Engine.run`. A
request that does not fit waits for the next batch, ahead of later ones. An error in a batch fails
that batch's requests only; the worker goes on.
"""

from __future__ import annotations

import collections
import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future

from pathor1_jax.serve.engine import Engine, Row, RowResult


class QueueFull(RuntimeError):
    """The queue holds `max_queue` waiting requests already."""


@dataclasses.dataclass
class _Request:
    rows: Sequence[Row]
    future: Future
    on_text: Callable[[int, str], None] | None


def _streamer(batch: Sequence[_Request]) -> Callable[[int, str], None]:
    """The batch's streaming callback: row of the batch → (its request, row of the request)."""
    owner = [(request, j) for request in batch for j in range(len(request.rows))]

    def stream(row: int, text: str) -> None:
        request, j = owner[row]
        if request.on_text is not None:
            request.on_text(j, text)

    return stream


class Scheduler:
    def __init__(self, engine: Engine, *, max_queue: int = 256, batch_wait_s: float = 0.005):
        self.engine = engine
        self.batch_wait_s = batch_wait_s
        self._queue: queue.Queue[_Request | None] = queue.Queue(maxsize=max_queue)
        self._held: _Request | None = None  # taken from the queue but not fitting the last batch
        self._thread = threading.Thread(target=self._loop, name="pathor1-generation", daemon=True)
        self._lock = threading.Lock()
        self.batch_rows: collections.Counter[int] = collections.Counter()  # rows per batch → batches
        self.counters = {"requests": 0, "rejected_queue_full": 0, "failed_batches": 0, "generated_tokens": 0}

    def start(self) -> Scheduler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def submit(self, rows: Sequence[Row], on_text: Callable[[int, str], None] | None = None) -> Future:
        """Queue one request (all its rows run in the same batch); `on_text(row, text)` streams."""
        if len(rows) > self.engine.max_batch:
            raise ValueError(f"a request of {len(rows)} rows exceeds the batch of {self.engine.max_batch}")
        request = _Request(rows, Future(), on_text)
        try:
            self._queue.put_nowait(request)
        except queue.Full:
            with self._lock:
                self.counters["rejected_queue_full"] += 1
            raise QueueFull(f"the request queue is full ({self._queue.maxsize} waiting)") from None
        with self._lock:
            self.counters["requests"] += 1
        return request.future

    def queued(self) -> int:
        return self._queue.qsize() + (self._held is not None)

    def _next_batch(self) -> list[_Request] | None:
        first = self._held or self._queue.get()
        self._held = None
        if first is None:
            return None
        batch, rows = [first], len(first.rows)
        deadline = time.monotonic() + self.batch_wait_s
        while rows < self.engine.max_batch:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)  # stop after this batch
                break
            if rows + len(item.rows) > self.engine.max_batch:
                self._held = item
                break
            batch.append(item)
            rows += len(item.rows)
        return batch

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            batch = [r for r in batch if r.future.set_running_or_notify_cancel()]
            offsets, rows = [], []
            for request in batch:
                offsets.append(len(rows))
                rows.extend(request.rows)
            try:
                results: list[RowResult] = self.engine.run(rows, _streamer(batch))
            except Exception as e:  # noqa: BLE001 — the batch fails, the server does not
                with self._lock:
                    self.counters["failed_batches"] += 1
                for request in batch:
                    request.future.set_exception(e)
                continue
            with self._lock:
                self.batch_rows[len(rows)] += 1
                self.counters["generated_tokens"] += sum(r.num_tokens for r in results)
            for request, start in zip(batch, offsets, strict=True):
                request.future.set_result(results[start : start + len(request.rows)])

    def stats(self) -> dict:
        with self._lock:
            return {
                **self.counters,
                "queued": self.queued(),
                "batches": sum(self.batch_rows.values()),
                "max_batch_rows": max(self.batch_rows, default=0),
                "batch_rows": {str(k): v for k, v in sorted(self.batch_rows.items())},
                **{f"engine_{k}": v for k, v in self.engine.stats().items()},
            }

"""Batched generation for many independent requests: the engine of `pathor1 serve` and `pathor1 eval vlm`.

A request is a chat (`Message`s, images inline) and its sampling settings; `n` choices are `n`
rows. `Engine.run(rows)` generates every row of a batch together: one jitted prefill of all the
prompts, then jitted `decode` chunks of `chunk` tokens each (`qwen2_5_vl.generate`'s pieces, so a
greedy row is token for token what `generate` gives for that prompt alone). Between chunks the host
decodes the new text of every row, hands it to a streaming callback, and stops rows whose text
reached one of their stop strings; a batch ends when all its rows have.

Shapes are bucketed so that few programs compile, whatever the requests: rows → a power of two
(times the devices the batch is split over; missing rows are padding, finished from the start),
prompt tokens → a power of two >= 64 (left padding), new tokens → a power of two >= 16 (the cache
holds prompt + new), image patches → a power of two (zero padding). A prefill compiles once per
(rows, prompt, cache, patches) bucket and a decode chunk once per (rows, cache, sampling on/off,
top-p on/off) bucket. The model may be sharded over a mesh: generation then runs under the
sharding rules, the batch split like training batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from pathor1_jax.data.images import ImageDecodeError
from pathor1_jax.data.processing import ImageCountError, QwenVLProcessor
from pathor1_jax.data.records import ChatRecord, Message
from pathor1_jax.logical import Rules, logical_to_spec, use_rules
from pathor1_jax.models import qwen2_5_vl
from pathor1_jax.models.qwen2_5_vl.generate import decode, prefill, prompt_inputs, special_token_ids

MIN_PROMPT_BUCKET = 64
MIN_NEW_BUCKET = 16


class RequestError(ValueError):
    """A request the engine cannot serve as asked (an HTTP 4xx for the server); says why."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_request"):
        super().__init__(message)
        self.status = status
        self.code = code


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one row is generated. temperature 0 = greedy; stop strings end the text (excluded)."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class EncodedPrompt:
    """A chat rendered for generation: token ids `[P]`, and the image patches / grids of its images."""

    input_ids: np.ndarray
    pixel_values: np.ndarray | None = None  # [N_patches, 1176]
    image_grid_thw: np.ndarray | None = None  # [N_images, 3]

    @property
    def num_patches(self) -> int:
        return 0 if self.pixel_values is None else int(self.pixel_values.shape[0])


@dataclasses.dataclass(frozen=True)
class Row:
    prompt: EncodedPrompt
    params: SamplingParams


@dataclasses.dataclass(frozen=True)
class RowResult:
    text: str
    token_ids: tuple[int, ...]  # generated ids, EOS excluded, cut after the token that completed a stop
    num_tokens: int  # generated tokens counted for usage (EOS included)
    finish_reason: str  # "stop" (EOS or a stop string) | "length"
    prompt_tokens: int


def next_power_of_two(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def holdback(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of `text` not yet safe to stream: a partial UTF-8 character, or the
    longest suffix that a stop string starts with."""
    if text.endswith("\ufffd"):
        return 1
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


class _RowState:
    """Host-side progress of one row: its tokens, text, what was streamed, why it ended."""

    def __init__(self, row: Row):
        self.row = row
        self.tokens: list[int] = []
        self.text = ""
        self.sent = 0  # characters handed to the stream so far
        self.finish_reason: str | None = None
        self.num_tokens = 0

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def result(self) -> RowResult:
        prompt_tokens = len(self.row.prompt.input_ids)
        return RowResult(
            self.text, tuple(self.tokens), self.num_tokens, self.finish_reason or "length", prompt_tokens
        )


class Engine:
    """Generation for batches of rows (module docstring). Thread-safe: one batch runs at a time."""

    def __init__(
        self,
        model: qwen2_5_vl.Qwen2_5_VLForConditionalGeneration,
        processor: QwenVLProcessor,
        *,
        mesh: Mesh | None = None,
        rules: Rules | None = None,
        max_batch: int = 32,
        max_model_len: int | None = None,
        chunk: int = 16,
        seed: int = 0,
    ):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.mesh, self.rules = mesh, tuple(rules or ())
        text = model.config.text
        self.max_model_len = int(max_model_len or text.max_position_embeddings)
        self.chunk = chunk
        self.eos, self.pad = special_token_ids(model.config, pad_token_id=processor.pad_token_id)
        self.batch_unit = self._batch_unit()
        self.max_batch = max(self.batch_unit, -(-max_batch // self.batch_unit) * self.batch_unit)
        self._seed = seed
        self._batches = 0
        self._lock = threading.Lock()
        self.shapes: set[tuple] = set()  # (rows, prompt, cache, patches) buckets run so far

    def _batch_unit(self) -> int:
        """Devices the batch dimension is split over (rows come in multiples of it)."""
        if self.mesh is None:
            return 1
        entry = logical_to_spec(("batch",), self.rules)[0]
        names = () if entry is None else (entry,) if isinstance(entry, str) else entry
        return math.prod(self.mesh.shape[a] for a in names)

    # --------------------------------------------------------------------------------- encoding

    def encode(self, messages: Sequence[Message], request_id: str = "request") -> EncodedPrompt:
        """The generation prompt of a chat (chat template, then `<|im_start|>assistant\\n`); images
        that cannot be decoded, or a count mismatch, are `RequestError`s."""
        chat = ChatRecord(id=request_id, messages=tuple(messages))
        try:
            example = self.processor.encode_prompt(chat)
        except (ImageDecodeError, ImageCountError) as e:
            raise RequestError(str(e), code="invalid_image") from None
        has_images = len(example["image_grid_thw"]) > 0
        return EncodedPrompt(
            input_ids=example["input_ids"].astype(np.int32),
            pixel_values=example["pixel_values"] if has_images else None,
            image_grid_thw=example["image_grid_thw"] if has_images else None,
        )

    def check(self, prompt: EncodedPrompt, params: SamplingParams) -> None:
        """`RequestError` when prompt + max_tokens does not fit the context."""
        n = len(prompt.input_ids)
        if params.max_tokens < 1:
            raise RequestError(f"max_tokens must be >= 1, got {params.max_tokens}")
        if n + params.max_tokens > self.max_model_len:
            raise RequestError(
                f"this model's context is {self.max_model_len} tokens; the prompt has {n} tokens and "
                f"max_tokens is {params.max_tokens} ({n + params.max_tokens} in all)",
                code="context_length_exceeded",
            )

    # --------------------------------------------------------------------------------- generation

    def _inputs(self, rows: Sequence[Row], num_rows: int, new_tokens: int) -> tuple[dict, int, int]:
        """Padded device inputs of a batch, its prompt and new-token buckets."""
        prompt_len = next_power_of_two(max(len(r.prompt.input_ids) for r in rows), MIN_PROMPT_BUCKET)
        new = next_power_of_two(max(new_tokens, *(r.params.max_tokens for r in rows)), MIN_NEW_BUCKET)
        ids = np.full((num_rows, prompt_len), self.pad, np.int32)
        mask = np.zeros_like(ids)
        mask[len(rows) :, -1] = 1  # padding rows: one pad token, finished from the start
        for i, r in enumerate(rows):
            n = len(r.prompt.input_ids)
            ids[i, prompt_len - n :] = r.prompt.input_ids
            mask[i, prompt_len - n :] = 1
        with_images = [r.prompt for r in rows if r.prompt.pixel_values is not None]
        pixels = grids = num_patches = None
        if with_images:
            pixels = np.concatenate([p.pixel_values for p in with_images])
            grids = np.concatenate([p.image_grid_thw for p in with_images])
            num_patches = next_power_of_two(len(pixels), 4)
        inputs = prompt_inputs(self.model.config, ids, mask, pixels, grids, num_patches)
        limit = np.zeros(num_rows, np.int32)
        temperature = np.zeros(num_rows, np.float32)
        top_p = np.ones(num_rows, np.float32)
        for i, r in enumerate(rows):
            limit[i], temperature[i], top_p[i] = r.params.max_tokens, r.params.temperature, r.params.top_p
        arrays = {**inputs, "limit": limit, "temperature": temperature, "top_p": top_p}
        return self._place(arrays), prompt_len, new

    def _place(self, arrays: dict) -> dict:
        """Host arrays onto the devices: batch-major arrays split over the batch axes on a mesh."""
        if self.mesh is None:
            return {k: v if v is None or k == "vision_index" else jnp.asarray(v) for k, v in arrays.items()}
        batch_axes = {
            "input_ids": ("batch", None),
            "attention_mask": ("batch", None),
            "position_ids": (None, "batch", None),
            "limit": ("batch",),
            "temperature": ("batch",),
            "top_p": ("batch",),
        }
        out = {}
        for k, v in arrays.items():
            if v is None or k == "vision_index":
                out[k] = v
            else:
                axes = batch_axes.get(k, (None,) * np.ndim(v))
                out[k] = jax.device_put(v, NamedSharding(self.mesh, logical_to_spec(axes, self.rules)))
        return out

    def row_bucket(self, rows: int) -> int:
        """Rows a batch of `rows` is padded to: a power of two, times the batch's devices."""
        return min(self.max_batch, -(-next_power_of_two(rows) // self.batch_unit) * self.batch_unit)

    def warmup(self, prompt_tokens: int, max_tokens: int) -> int:
        """Compile, before any request, what batches of prompts up to `prompt_tokens` tokens asking up
        to `max_tokens` new tokens run (text only): every row bucket, greedy and sampled. Returns
        the number of batches run (one decode chunk each)."""
        prompt = EncodedPrompt(
            np.full(min(prompt_tokens, self.max_model_len - max_tokens), self.pad, np.int32)
        )
        buckets = sorted({self.row_bucket(2**k) for k in range(self.max_batch.bit_length())})
        for rows in buckets:
            for temperature in (0.0, 1.0):
                self.run_padded([Row(prompt, SamplingParams(1, temperature))], rows, max_tokens)
        return 2 * len(buckets)

    def run_padded(self, rows: Sequence[Row], num_rows: int, new_tokens: int) -> list[RowResult]:
        """`run` in a given row bucket and new-token bucket (for `warmup`)."""
        with self._lock, self._rules():
            return self._run(rows, num_rows=num_rows, new_tokens=new_tokens)

    def _rules(self):
        return contextlib.nullcontext() if self.mesh is None else use_rules(self.mesh, self.rules)

    def run(self, rows: Sequence[Row], on_text: Callable[[int, str], None] | None = None) -> list[RowResult]:
        """Generate every row (at most `max_batch`); `on_text(row, new_text)` streams text as it comes."""
        if not rows:
            return []
        if len(rows) > self.max_batch:
            raise ValueError(f"{len(rows)} rows, more than max_batch={self.max_batch}")
        with self._lock, self._rules():
            return self._run(rows, on_text)

    def _run(
        self, rows: Sequence[Row], on_text=None, *, num_rows: int = 0, new_tokens: int = 0
    ) -> list[RowResult]:
        num_rows = num_rows or self.row_bucket(len(rows))
        x, prompt_len, new = self._inputs(rows, num_rows, new_tokens)
        pixels = x["pixel_values"]
        self.shapes.add((num_rows, prompt_len, prompt_len + new, None if pixels is None else pixels.shape[0]))
        self._batches += 1
        state = prefill(
            self.model,
            x["input_ids"],
            x["attention_mask"],
            None if pixels is None else pixels.astype(self.model.dtype),
            x["vision_index"],
            x["position_ids"],
            jax.random.key(self._seed + self._batches),
            x["limit"],
            x["temperature"],
            x["top_p"],
            max_len=prompt_len + new,
        )
        sample = any(r.params.temperature > 0 for r in rows)
        nucleus = any(r.params.temperature > 0 and r.params.top_p < 1 for r in rows)
        states = [_RowState(r) for r in rows]
        steps = 0
        while not all(s.done for s in states) and steps < new:
            state, tokens = decode(
                self.model,
                state,
                num_steps=self.chunk,
                sample=sample,
                nucleus=nucleus,
                eos_token_id=self.eos,
                pad_token_id=self.pad,
            )
            steps += self.chunk
            tokens = np.asarray(tokens)
            stopped = np.zeros(num_rows, bool)
            for i, s in enumerate(states):
                if not s.done:
                    stopped[i] = self._advance(i, s, tokens[i], on_text)
            if stopped.any():
                state = state.stop_rows(stopped)
        return [s.result() for s in states]

    def _advance(self, index: int, s: _RowState, chunk: np.ndarray, on_text) -> bool:
        """Take a row's new tokens; True when the host stopped it (a stop string), which the device
        does not know about."""
        for token in chunk.tolist():
            s.num_tokens += 1
            if token == self.eos:
                s.finish_reason = "stop"
                break
            s.tokens.append(token)
            if s.num_tokens >= s.row.params.max_tokens:
                s.finish_reason = "length"
                break
        s.text = self.tokenizer.decode(s.tokens, skip_special_tokens=True)
        stopped_here = False
        hits = [(s.text.find(stop), stop) for stop in s.row.params.stop if stop in s.text]
        if hits:
            at, stop = min(hits)
            s.text = s.text[:at]
            s.tokens = self._tokens_through(s.tokens, at + len(stop))
            s.num_tokens = len(s.tokens)
            stopped_here = s.finish_reason is None
            s.finish_reason = "stop"
        safe = len(s.text) - (0 if s.done else holdback(s.text, s.row.params.stop))
        if on_text is not None and safe > s.sent:
            on_text(index, s.text[s.sent : safe])
        s.sent = max(s.sent, safe)
        return stopped_here

    def _tokens_through(self, tokens: list[int], chars: int) -> list[int]:
        """The shortest prefix of `tokens` whose text has at least `chars` characters."""
        lo, hi = 1, len(tokens)
        while lo < hi:
            mid = (lo + hi) // 2
            if len(self.tokenizer.decode(tokens[:mid], skip_special_tokens=True)) >= chars:
                hi = mid
            else:
                lo = mid + 1
        return tokens[:lo]

    def stats(self) -> dict:
        return {"batches": self._batches, "compiled_shapes": len(self.shapes)}

"""The Qwen2.5-VL chat template (shipped with the package) and rendering of chat records.

`templates/qwen2_5_vl_chat_template.jinja` is the official template text of the Qwen2.5-VL Instruct
checkpoints (`chat_template.json`): a default system prompt when the chat has none, one
`<|vision_start|><|image_pad|><|vision_end|>` per image, `<|im_start|>role\\n...<|im_end|>\\n` per turn.
It is rendered with the same Jinja settings as transformers' `apply_chat_template`.

Text is text: `render_pieces` tells the template's own characters from the messages' text, so that
a tokenizer can keep special-token strings inside message text (`<|im_end|>`, `<|image_pad|>`)
as plain characters — only the template inserts control tokens (see `QwenVLProcessor`).
"""

from __future__ import annotations

import functools
import re
from importlib import resources

from jinja2.sandbox import ImmutableSandboxedEnvironment

from .records import ChatRecord, ImagePart, Message, TextPart

TEMPLATE_FILE = "qwen2_5_vl_chat_template.jinja"
ASSISTANT_HEADER = "<|im_start|>assistant\n"
TURN_END = "<|im_end|>"


def template_text() -> str:
    return resources.files("pathor1_jax.data").joinpath("templates", TEMPLATE_FILE).read_text()


@functools.cache
def _compiled():
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template_text())


def messages_to_json(messages: tuple[Message, ...] | list[Message]) -> list[dict]:
    """Messages in the template's format (content: a string or a list of typed parts)."""
    out = []
    for m in messages:
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        parts = [
            {"type": "text", "text": p.text} if isinstance(p, TextPart) else {"type": "image"}
            for p in m.content
            if isinstance(p, (TextPart, ImagePart))
        ]
        out.append({"role": m.role, "content": parts})
    return out


def render_messages(messages, *, add_generation_prompt: bool = False) -> str:
    """The chat template applied to `messages` (`Message`s or template-format dicts)."""
    if messages and isinstance(messages[0], Message):
        messages = messages_to_json(messages)
    return _compiled().render(messages=messages, add_generation_prompt=add_generation_prompt)


_MARK = ("\ue000", "\ue001")  # private-use characters around a text's index while rendering


def render_pieces(messages, *, add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
    """The rendered chat as `(piece, is_text)` pieces whose concatenation is `render_messages(...)`:
    `is_text` for a message's text as written, False for what the template adds around it."""
    messages = messages_to_json(messages) if messages and isinstance(messages[0], Message) else messages
    texts: list[str] = []

    def mark(text: str) -> str:
        texts.append(text)
        return f"{_MARK[0]}{len(texts) - 1}{_MARK[1]}"

    marked = []
    for m in messages:
        if isinstance(m["content"], str):
            marked.append({**m, "content": mark(m["content"])})
        else:
            parts = [{**p, "text": mark(p["text"])} if p.get("type") == "text" else p for p in m["content"]]
            marked.append({**m, "content": parts})
    if any(c in t for t in texts for c in _MARK):  # a text holding the marks: no pieces to tell apart
        return [(render_messages(messages, add_generation_prompt=add_generation_prompt), True)]
    rendered = render_messages(marked, add_generation_prompt=add_generation_prompt)
    pieces: list[tuple[str, bool]] = []
    for i, chunk in enumerate(re.split(f"{_MARK[0]}(\\d+){_MARK[1]}", rendered)):
        if i % 2:
            pieces.append((texts[int(chunk)], True))
        elif chunk:
            pieces.append((chunk, False))
    return pieces


def render_with_spans(record: ChatRecord) -> tuple[str, list[tuple[int, int]]]:
    """The rendered chat and the character spans `[start, end)` that carry loss: each assistant
    turn's content through its `<|im_end|>` (the header `<|im_start|>assistant\\n` and the newline
    after `<|im_end|>` are excluded).

    Uses that the template renders a chat as the concatenation of its turns: the text of turn i is
    `render(messages[:i+1])[len(render(messages[:i])):]`.
    """
    messages = messages_to_json(record.messages)
    spans: list[tuple[int, int]] = []
    previous = ""
    for i, message in enumerate(messages):
        text = render_messages(messages[: i + 1])
        if not text.startswith(previous):
            raise ValueError(f"record {record.id!r}: chat template is not prefix-stable at turn {i}")
        if message["role"] == "assistant":
            turn = text[len(previous) :]
            start = turn.find(ASSISTANT_HEADER)
            end = turn.rfind(TURN_END)
            if start < 0 or end < 0:
                raise ValueError(
                    f"record {record.id!r}: cannot locate assistant turn {i} in the rendered chat"
                )
            spans.append((len(previous) + start + len(ASSISTANT_HEADER), len(previous) + end + len(TURN_END)))
        previous = text
    return previous, spans

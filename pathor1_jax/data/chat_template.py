"""The Qwen2.5-VL chat template (shipped with the package) and rendering of chat records.

`templates/qwen2_5_vl_chat_template.jinja` is the official template text of the Qwen2.5-VL Instruct
checkpoints (`chat_template.json`): a default system prompt when the chat has none, one
`<|vision_start|><|image_pad|><|vision_end|>` per image, `<|im_start|>role\\n...<|im_end|>\\n` per turn.
It is rendered with the same Jinja settings as transformers' `apply_chat_template`.
"""

from __future__ import annotations

import functools
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

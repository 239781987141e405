"""Turning caption and MCQ records into chats (the one format the Qwen2.5-VL processing consumes).

- CPT: a caption record becomes `user: [image, prompt]`, `assistant: caption`; only the caption
  (and its `<|im_end|>`) carries loss.
- MCQ (RL / evaluation): `user: [images..., question + lettered options + answer-format instruction]`;
  the reference completion is `<think>…</think><answer>LETTER</answer>` when a rationale is given.
"""

from __future__ import annotations

from .records import CaptionRecord, ChatRecord, ImagePart, MCQRecord, Message, TextPart

CAPTION_PROMPT = "Describe this pathology image."
MCQ_INSTRUCTION = (
    "Think step by step inside <think></think>, then give the letter of the correct option inside "
    "<answer></answer>."
)


def caption_to_chat(record: CaptionRecord, prompt: str = CAPTION_PROMPT) -> ChatRecord:
    user_parts = (ImagePart(record.image), TextPart(prompt)) if prompt else (ImagePart(record.image),)
    return ChatRecord(
        id=record.id,
        messages=(Message("user", user_parts), Message("assistant", record.caption)),
        subfield=record.subfield,
        task="caption",
    )


def mcq_question_text(record: MCQRecord, instruction: str = MCQ_INSTRUCTION) -> str:
    options = "\n".join(f"{letter}. {text}" for letter, text in record.options.items())
    return f"{record.question}\n{options}\n{instruction}" if instruction else f"{record.question}\n{options}"


def mcq_prompt_messages(record: MCQRecord, instruction: str = MCQ_INSTRUCTION) -> tuple[Message, ...]:
    """The user turn of an MCQ (for generation with `add_generation_prompt=True`)."""
    parts = tuple(ImagePart(ref) for ref in record.images) + (
        TextPart(mcq_question_text(record, instruction)),
    )
    return (Message("user", parts),)


def mcq_to_chat(record: MCQRecord, rationale: str, instruction: str = MCQ_INSTRUCTION) -> ChatRecord:
    """An SFT chat answering the MCQ: `<think>{rationale}</think><answer>{letter}</answer>`."""
    answer = f"<think>{rationale}</think><answer>{record.answer}</answer>"
    return ChatRecord(
        id=record.id,
        messages=mcq_prompt_messages(record, instruction) + (Message("assistant", answer),),
        subfield=record.subfield,
        task="MCQ",
    )

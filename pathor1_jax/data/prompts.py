"""Turning caption and MCQ records into chats (the one format the Qwen2.5-VL processing consumes).

- CPT: a caption record becomes `user: [image, prompt]`, `assistant: caption`; only the caption
  (and its `<|im_end|>`) carries loss.
- MCQ (SFT, RL, evaluation): `[system: style prompt,] user: [images..., question + options]`; the
  reference completion is `<think>…</think><answer>LETTER</answer>` when a rationale is given.

How an MCQ (or an open / yes-no question) is worded is a named prompt style, `PROMPT_STYLES`:

- `patho_r1` (the default): Patho-R1's released inference prompt, verbatim from the authors' README:
  a system message asking for step-by-step reasoning in `<think> … </think><answer> … </answer>`,
  and the options appended to the question joined by a literal ` /n ` (space, slash, n, space).
- `patho_r1_cod`: their Chain-of-Draft variant (same tags, "a minimum draft for each thinking step,
  with 5 words at most"), as in the same README.
- `vlmevalkit`: VLMEvalKit's MCQ prompt (no system message; `Question: …`, `Options:` one per line,
  `Please select the correct answer from the options above.`), as the paper's benchmarks ran.
- `plain`: ours (the project's first format): Qwen's default system prompt, options one per line,
  then an instruction to answer inside `<think></think>` / `<answer></answer>`.
"""

from __future__ import annotations

import dataclasses

from .records import CaptionRecord, ChatRecord, ImagePart, ImageRef, MCQRecord, Message, TextPart

CAPTION_PROMPT = "Describe this pathology image."


@dataclasses.dataclass(frozen=True)
class PromptStyle:
    """How a question is put to the model.

    system: the system message (None: no system turn; the chat template then adds Qwen's default).
    option_separator: between the question and each `X. option` (` /n ` or a newline).
    question_prefix / options_header / instruction: text around the question and its options
    (empty: none).
    """

    name: str
    system: str | None
    option_separator: str
    question_prefix: str = ""
    options_header: str = ""
    instruction: str = ""


PATHO_R1_SYSTEM = (
    "You are a pathology expert, your task is to answer question step by step. Use the following "
    "format:<think> Your step-by-step reasoning </think><answer> Your final answer </answer>"
)
PATHO_R1_COD_SYSTEM = (
    "You are a pathology expert, your task is to think step by step, but only keep a minimum draft for "
    "each thinking step, with 5 words at most. Return the answer at the end of the response after a "
    "separator. Use the following format:<think> Your step-by-step reasoning </think><answer> Your final "
    "answer </answer>"
)
PLAIN_INSTRUCTION = (  # ours
    "Think step by step inside <think></think>, then give the letter of the correct option inside "
    "<answer></answer>."
)

PROMPT_STYLES: dict[str, PromptStyle] = {
    "patho_r1": PromptStyle("patho_r1", PATHO_R1_SYSTEM, " /n "),
    "patho_r1_cod": PromptStyle("patho_r1_cod", PATHO_R1_COD_SYSTEM, " /n "),
    "vlmevalkit": PromptStyle(
        "vlmevalkit",
        None,
        "\n",
        question_prefix="Question: ",
        options_header="Options:",
        instruction="Please select the correct answer from the options above.",
    ),
    "plain": PromptStyle("plain", None, "\n", instruction=PLAIN_INSTRUCTION),
}
DEFAULT_PROMPT_STYLE = "patho_r1"


def prompt_style(name: str) -> PromptStyle:
    """The style called `name`; an unknown name is a `ValueError` listing the styles."""
    if name not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {name!r}; expected one of {sorted(PROMPT_STYLES)}")
    return PROMPT_STYLES[name]


def caption_to_chat(record: CaptionRecord, prompt: str = CAPTION_PROMPT) -> ChatRecord:
    user_parts = (ImagePart(record.image), TextPart(prompt)) if prompt else (ImagePart(record.image),)
    return ChatRecord(
        id=record.id,
        messages=(Message("user", user_parts), Message("assistant", record.caption)),
        subfield=record.subfield,
        task="caption",
    )


def question_text(question: str, options: dict[str, str], style: str = DEFAULT_PROMPT_STYLE) -> str:
    """The user text of a question in `style`; `options` (letter → text) may be empty (open and
    yes/no questions: the question alone, with the style's prefix)."""
    s = prompt_style(style)
    lines = [f"{s.question_prefix}{question}"]
    if options:
        if s.options_header:
            lines.append(s.options_header)
        lines.extend(f"{letter}. {text}" for letter, text in options.items())
        if s.instruction:
            lines.append(s.instruction)
    return s.option_separator.join(lines)


def question_messages(
    question: str,
    options: dict[str, str],
    images: tuple[ImageRef, ...],
    style: str = DEFAULT_PROMPT_STYLE,
) -> tuple[Message, ...]:
    """The prompt turns of a question (for generation with `add_generation_prompt=True`): the style's
    system message, if any, then `user: [images..., question text]`."""
    s = prompt_style(style)
    user = Message(
        "user", tuple(ImagePart(ref) for ref in images) + (TextPart(question_text(question, options, style)),)
    )
    return ((Message("system", s.system),) if s.system is not None else ()) + (user,)


def mcq_question_text(record: MCQRecord, style: str = DEFAULT_PROMPT_STYLE) -> str:
    return question_text(record.question, record.options, style)


def mcq_prompt_messages(record: MCQRecord, style: str = DEFAULT_PROMPT_STYLE) -> tuple[Message, ...]:
    """The prompt turns of an MCQ in `style` (see `question_messages`)."""
    return question_messages(record.question, record.options, record.images, style)


def mcq_to_chat(record: MCQRecord, rationale: str, style: str = DEFAULT_PROMPT_STYLE) -> ChatRecord:
    """An SFT chat answering the MCQ: `<think>{rationale}</think><answer>{letter}</answer>`."""
    answer = f"<think>{rationale}</think><answer>{record.answer}</answer>"
    return ChatRecord(
        id=record.id,
        messages=mcq_prompt_messages(record, style) + (Message("assistant", answer),),
        subfield=record.subfield,
        task="MCQ",
    )

"""Record schemas of the three kinds of data Patho-R1 trains on, with validation.

One JSON object per record (JSONL line, or the `record` text of an ArrayRecord entry):

- **caption** (CPT and PathoCLIP): `{"id": str, "image": IMAGE, "caption": str, "subfield"?: str,
  "source"?: str}`.
- **chat** (SFT): `{"id": str, "messages": [MESSAGE, ...], "images"?: [IMAGE, ...], "subfield"?: str,
  "difficulty"?: str, "task"?: str}`. A MESSAGE is `{"role": "system"|"user"|"assistant", "content":
  str | [PART, ...]}`, a PART `{"type": "text", "text": str}` or `{"type": "image"}` (a placeholder
  filled in order from `images`) or `{"type": "image", "image": IMAGE}` (inline). The images of a
  chat are its inline images and its `images` list in placeholder order; their number must equal the
  number of image placeholders.
- **mcq** (RL and evaluation): `{"id": str, "image"|"images": IMAGE | [IMAGE, ...], "question": str,
  "options": {"A": str, "B": str, ...}, "answer": "A".."F", "subfield"?: str, "benchmark"?: str,
  "category"?: str, "l2_category"?: str, "split"?: str}`; options are contiguous letters from A (2 to
  6 of them) and the answer is one of them. `benchmark` / `category` / `split` group the scores of
  `pathor1 eval vlm` (e.g. PathMMU, its sources Atlas … SocialPath, test_tiny / test / val).
- **vqa** (evaluation): `{"id": str, "image"|"images": ..., "question": str, "answer": str,
  "answer_type": "yes_no" | "open", "reasoning"?: str, "benchmark"?: str, "category"?: str,
  "l2_category"?: str, "split"?: str}`; a yes/no answer is "yes" or "no" (any case, stored
  lower-case); `reasoning` is an optional reference reasoning chain the open-ended judge may compare
  the model's steps with.

An IMAGE is a path string (relative paths resolve against the file the record came from),
`{"path": str}`, or `{"bytes_b64": str}` (base64 of an encoded PNG/JPEG). Inside ArrayRecord files
images are stored as raw encoded bytes beside the record (see `array_record.py`).

`parse_record(kind, obj, where)` validates a decoded JSON object and raises `RecordError` naming
`where` (e.g. `"train.jsonl:12"`) and the offending field.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

from pathor1_jax.errors import UserError

RecordKind = Literal["caption", "chat", "mcq", "vqa"]
KINDS: tuple[str, ...] = ("caption", "chat", "mcq", "vqa")
ANSWER_TYPES: tuple[str, ...] = ("yes_no", "open")
ROLES: tuple[str, ...] = ("system", "user", "assistant")
OPTION_LETTERS: str = "ABCDEF"


class RecordError(UserError):
    """A record that does not follow its schema; the message names where it came from."""


@dataclass(frozen=True)
class ImageRef:
    """An image by file path or by encoded bytes (exactly one is set)."""

    path: str | None = None
    data: bytes | None = None

    def to_json(self) -> str | dict[str, str]:
        if self.data is not None:
            return {"bytes_b64": base64.b64encode(self.data).decode("ascii")}
        return str(self.path)


@dataclass(frozen=True)
class TextPart:
    text: str
    type: Literal["text"] = "text"


@dataclass(frozen=True)
class ImagePart:
    """An image placeholder; `image` is set for inline images, None for "take the next from `images`"."""

    image: ImageRef | None = None
    type: Literal["image"] = "image"


Part = TextPart | ImagePart


@dataclass(frozen=True)
class Message:
    role: str
    content: str | tuple[Part, ...]


@dataclass(frozen=True)
class CaptionRecord:
    id: str
    image: ImageRef
    caption: str
    subfield: str = ""
    source: str = ""

    @property
    def images(self) -> tuple[ImageRef, ...]:
        return (self.image,)


@dataclass(frozen=True)
class ChatRecord:
    id: str
    messages: tuple[Message, ...]
    images: tuple[ImageRef, ...] = ()
    subfield: str = ""
    difficulty: str = ""
    task: str = ""

    def all_images(self) -> tuple[ImageRef, ...]:
        """Images in placeholder order: inline images where they stand, `images` for bare placeholders."""
        listed = iter(self.images)
        out: list[ImageRef] = []
        for message in self.messages:
            if isinstance(message.content, str):
                continue
            for part in message.content:
                if isinstance(part, ImagePart):
                    ref = part.image if part.image is not None else next(listed, None)
                    if ref is not None:
                        out.append(ref)
        out.extend(listed)  # surplus images: kept so that the count check can report them
        return tuple(out)

    def num_placeholders(self) -> int:
        return sum(
            isinstance(part, ImagePart)
            for m in self.messages
            if not isinstance(m.content, str)
            for part in m.content
        )


@dataclass(frozen=True)
class MCQRecord:
    id: str
    images: tuple[ImageRef, ...]
    question: str
    options: dict[str, str]  # contiguous letters from "A"
    answer: str  # one of the option letters
    subfield: str = ""
    benchmark: str = ""
    category: str = ""
    l2_category: str = ""
    split: str = ""


@dataclass(frozen=True)
class VQARecord:
    id: str
    images: tuple[ImageRef, ...]
    question: str
    answer: str  # "yes" | "no" when answer_type == "yes_no"
    answer_type: str  # one of ANSWER_TYPES
    reasoning: str = ""  # reference reasoning, when the benchmark has one
    benchmark: str = ""
    category: str = ""
    l2_category: str = ""
    split: str = ""


Record = CaptionRecord | ChatRecord | MCQRecord | VQARecord
GROUP_FIELDS: tuple[str, ...] = ("benchmark", "category", "l2_category", "split")


def _fail(where: str, rid: Any, msg: str) -> RecordError:
    rec = f" (record {rid!r})" if rid is not None else ""
    return RecordError(f"{where}{rec}: {msg}")


def _string(obj: dict, key: str, where: str, rid: Any, *, required: bool = True, empty: bool = False) -> str:
    if key not in obj:
        if required:
            raise _fail(where, rid, f"missing field '{key}'")
        return ""
    value = obj[key]
    if not isinstance(value, str) or (not empty and not value.strip()):
        raise _fail(where, rid, f"field '{key}' must be a non-empty string, got {value!r:.80}")
    return value


def parse_image(value: Any, where: str, rid: Any, key: str = "image") -> ImageRef:
    if isinstance(value, str) and value:
        return ImageRef(path=value)
    if isinstance(value, dict) and isinstance(value.get("path"), str) and value["path"]:
        return ImageRef(path=value["path"])
    if isinstance(value, dict) and isinstance(value.get("bytes_b64"), str):
        try:
            return ImageRef(data=base64.b64decode(value["bytes_b64"], validate=True))
        except binascii.Error as e:
            raise _fail(where, rid, f"field '{key}': invalid base64 ({e})") from None
    raise _fail(where, rid, f"field '{key}' must be a path string, {{'path': ...}} or {{'bytes_b64': ...}}")


def _parse_images(obj: dict, where: str, rid: Any) -> tuple[ImageRef, ...]:
    if "images" in obj:
        value = obj["images"]
        if not isinstance(value, list):
            raise _fail(where, rid, "field 'images' must be a list")
        return tuple(parse_image(v, where, rid, f"images[{i}]") for i, v in enumerate(value))
    if "image" in obj:
        return (parse_image(obj["image"], where, rid),)
    return ()


def _parse_message(value: Any, i: int, where: str, rid: Any) -> Message:
    key = f"messages[{i}]"
    if not isinstance(value, dict):
        raise _fail(where, rid, f"field '{key}' must be an object")
    role = value.get("role")
    if role not in ROLES:
        raise _fail(where, rid, f"field '{key}.role' must be one of {ROLES}, got {role!r}")
    content = value.get("content")
    if isinstance(content, str):
        return Message(role, content)
    if not isinstance(content, list):
        raise _fail(where, rid, f"field '{key}.content' must be a string or a list of parts")
    parts: list[Part] = []
    for j, part in enumerate(content):
        pkey = f"{key}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append(TextPart(part["text"]))
        elif kind == "image":
            inline = part.get("image")
            parts.append(ImagePart(None if inline is None else parse_image(inline, where, rid, pkey)))
        else:
            raise _fail(
                where, rid, f"field '{pkey}' must be {{'type': 'text', 'text': str}} or {{'type': 'image'}}"
            )
    return Message(role, tuple(parts))


def parse_caption(obj: dict, where: str) -> CaptionRecord:
    rid = obj.get("id")
    if "image" not in obj:
        raise _fail(where, rid, "missing field 'image'")
    return CaptionRecord(
        id=_string(obj, "id", where, rid),
        image=parse_image(obj["image"], where, rid),
        caption=_string(obj, "caption", where, rid),
        subfield=_string(obj, "subfield", where, rid, required=False, empty=True),
        source=_string(obj, "source", where, rid, required=False, empty=True),
    )


def parse_chat(obj: dict, where: str) -> ChatRecord:
    rid = obj.get("id")
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _fail(where, rid, "field 'messages' must be a non-empty list")
    parsed = tuple(_parse_message(m, i, where, rid) for i, m in enumerate(messages))
    if not any(m.role == "assistant" for m in parsed):
        raise _fail(where, rid, "field 'messages' has no assistant turn (nothing to train on)")
    return ChatRecord(
        id=_string(obj, "id", where, rid),
        messages=parsed,
        images=_parse_images(obj, where, rid),
        subfield=_string(obj, "subfield", where, rid, required=False, empty=True),
        difficulty=_string(obj, "difficulty", where, rid, required=False, empty=True),
        task=_string(obj, "task", where, rid, required=False, empty=True),
    )


def parse_mcq(obj: dict, where: str) -> MCQRecord:
    rid = obj.get("id")
    options = obj.get("options")
    if not isinstance(options, dict) or not all(isinstance(v, str) and v for v in options.values()):
        raise _fail(where, rid, "field 'options' must be an object of letter -> non-empty string")
    letters = "".join(sorted(options))
    if not (2 <= len(letters) <= len(OPTION_LETTERS)) or letters != OPTION_LETTERS[: len(letters)]:
        raise _fail(
            where, rid, f"field 'options' must use contiguous letters from A (2 to 6), got {letters!r}"
        )
    answer = _string(obj, "answer", where, rid)
    if answer not in options:
        raise _fail(where, rid, f"field 'answer' must be one of {list(letters)}, got {answer!r}")
    return MCQRecord(
        id=_string(obj, "id", where, rid),
        images=_parse_images(obj, where, rid),
        question=_string(obj, "question", where, rid),
        options={k: options[k] for k in letters},
        answer=answer,
        subfield=_string(obj, "subfield", where, rid, required=False, empty=True),
        **_groups(obj, where, rid),
    )


def _groups(obj: dict, where: str, rid: Any) -> dict[str, str]:
    return {k: _string(obj, k, where, rid, required=False, empty=True) for k in GROUP_FIELDS}


def parse_vqa(obj: dict, where: str) -> VQARecord:
    rid = obj.get("id")
    answer_type = obj.get("answer_type")
    if answer_type not in ANSWER_TYPES:
        raise _fail(where, rid, f"field 'answer_type' must be one of {ANSWER_TYPES}, got {answer_type!r}")
    answer = _string(obj, "answer", where, rid).strip()
    if answer_type == "yes_no":
        answer = answer.lower()
        if answer not in ("yes", "no"):
            raise _fail(
                where, rid, f"field 'answer' of a yes_no question must be 'yes' or 'no', got {answer!r}"
            )
    return VQARecord(
        id=_string(obj, "id", where, rid),
        images=_parse_images(obj, where, rid),
        question=_string(obj, "question", where, rid),
        answer=answer,
        answer_type=answer_type,
        reasoning=_string(obj, "reasoning", where, rid, required=False, empty=True),
        **_groups(obj, where, rid),
    )


_PARSERS = {"caption": parse_caption, "chat": parse_chat, "mcq": parse_mcq, "vqa": parse_vqa}


def parse_record(kind: str, obj: Any, where: str) -> Record:
    """Validate one decoded JSON object as a record of `kind`; errors name `where`."""
    if kind not in _PARSERS:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {KINDS}")
    if not isinstance(obj, dict):
        raise RecordError(f"{where}: a record must be a JSON object, got {type(obj).__name__}")
    return _PARSERS[kind](obj, where)


def _part_json(part: Part) -> dict:
    if isinstance(part, TextPart):
        return {"type": "text", "text": part.text}
    return {"type": "image"} if part.image is None else {"type": "image", "image": part.image.to_json()}


def record_to_json(record: Record) -> dict:
    """The JSON object of a record (inverse of `parse_record`)."""
    if isinstance(record, CaptionRecord):
        out: dict[str, Any] = {"id": record.id, "image": record.image.to_json(), "caption": record.caption}
        extra = {"subfield": record.subfield, "source": record.source}
    elif isinstance(record, ChatRecord):
        out = {
            "id": record.id,
            "messages": [
                {
                    "role": m.role,
                    "content": m.content
                    if isinstance(m.content, str)
                    else [_part_json(p) for p in m.content],
                }
                for m in record.messages
            ],
        }
        if record.images:
            out["images"] = [i.to_json() for i in record.images]
        extra = {"subfield": record.subfield, "difficulty": record.difficulty, "task": record.task}
    elif isinstance(record, MCQRecord):
        out = {
            "id": record.id,
            "images": [i.to_json() for i in record.images],
            "question": record.question,
            "options": dict(record.options),
            "answer": record.answer,
        }
        extra = {"subfield": record.subfield, **{k: getattr(record, k) for k in GROUP_FIELDS}}
    else:
        out = {
            "id": record.id,
            "images": [i.to_json() for i in record.images],
            "question": record.question,
            "answer": record.answer,
            "answer_type": record.answer_type,
        }
        extra = {"reasoning": record.reasoning, **{k: getattr(record, k) for k in GROUP_FIELDS}}
    out.update({k: v for k, v in extra.items() if v})
    return out


def kind_of(record: Record) -> str:
    return {CaptionRecord: "caption", ChatRecord: "chat", MCQRecord: "mcq", VQARecord: "vqa"}[type(record)]


def map_images(record: Record, fn: Callable[[ImageRef], ImageRef]) -> Record:
    """A copy of `record` with `fn` applied to every image reference (inline ones included)."""
    if isinstance(record, CaptionRecord):
        return replace(record, image=fn(record.image))
    if isinstance(record, (MCQRecord, VQARecord)):
        return replace(record, images=tuple(fn(i) for i in record.images))
    messages = tuple(
        m
        if isinstance(m.content, str)
        else replace(
            m,
            content=tuple(
                ImagePart(fn(p.image)) if isinstance(p, ImagePart) and p.image is not None else p
                for p in m.content
            ),
        )
        for m in record.messages
    )
    return replace(record, messages=messages, images=tuple(fn(i) for i in record.images))

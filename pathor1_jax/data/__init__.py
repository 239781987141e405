"""Data: record schemas and readers (JSONL, ArrayRecord), Qwen2.5-VL processing, packing, grain
pipelines with checkpointable iterators, and the embedded demo dataset.

Trainer entry point: `batch_iterator_from_config(config.data, rope_config=model_config)`.
"""

from __future__ import annotations

import importlib
from typing import Any

# The public names and the submodule each comes from. They are imported on first use (PEP 562), so
# that importing one light submodule (`records`, `jsonl`, `llm`) does not pay for grain, jax and
# orbax (`pipeline`): every `pathor1` process that needs no input pipeline starts faster.
_NAMES = {
    "chat_template": "render_messages render_with_spans template_text",
    "demo": "demo_dir demo_path demo_records",
    "images": "ImageDecodeError load_image",
    "jsonl": "read_jsonl read_jsonl_files write_jsonl",
    "packing": "BatchPacker fit_to_length pack_examples real_grids",
    "pipeline": (
        "EncodeExample ProcessorSpec batch_iterator_from_config default_data_config "
        "default_tokenizer_path get_processor load_source make_batch_dataset make_batch_iterator "
        "processor_spec_from_config record_dataset"
    ),
    "processing": "IGNORE_INDEX ImageCountError QwenVLProcessor",
    "prompts": "caption_to_chat mcq_prompt_messages mcq_question_text mcq_to_chat",
    "records": (
        "CaptionRecord ChatRecord ImagePart ImageRef MCQRecord Message Record RecordError "
        "TextPart parse_record record_to_json"
    ),
}
_EXPORTS = {name: module for module, names in _NAMES.items() for name in names.split()}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})

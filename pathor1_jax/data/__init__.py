"""Data: record schemas and readers (JSONL, ArrayRecord), Qwen2.5-VL processing, packing, grain
pipelines with checkpointable iterators, and the embedded demo dataset.

Trainer entry point: `batch_iterator_from_config(config.data, rope_config=model_config)`.
"""

from .chat_template import render_messages, render_with_spans, template_text
from .demo import demo_dir, demo_path, demo_records
from .images import ImageDecodeError, load_image
from .jsonl import read_jsonl, read_jsonl_files, write_jsonl
from .packing import BatchPacker, fit_to_length, pack_examples, real_grids
from .pipeline import (
    EncodeExample,
    ProcessorSpec,
    batch_iterator_from_config,
    default_data_config,
    default_tokenizer_path,
    get_processor,
    load_source,
    make_batch_dataset,
    make_batch_iterator,
    processor_spec_from_config,
    record_dataset,
)
from .processing import IGNORE_INDEX, ImageCountError, QwenVLProcessor
from .prompts import caption_to_chat, mcq_prompt_messages, mcq_question_text, mcq_to_chat
from .records import (
    CaptionRecord,
    ChatRecord,
    ImagePart,
    ImageRef,
    MCQRecord,
    Message,
    Record,
    RecordError,
    TextPart,
    parse_record,
    record_to_json,
)

__all__ = [
    "IGNORE_INDEX",
    "BatchPacker",
    "CaptionRecord",
    "ChatRecord",
    "EncodeExample",
    "ImageCountError",
    "ImageDecodeError",
    "ImagePart",
    "ImageRef",
    "MCQRecord",
    "Message",
    "ProcessorSpec",
    "QwenVLProcessor",
    "Record",
    "RecordError",
    "TextPart",
    "batch_iterator_from_config",
    "caption_to_chat",
    "default_data_config",
    "default_tokenizer_path",
    "demo_dir",
    "demo_path",
    "demo_records",
    "fit_to_length",
    "get_processor",
    "load_image",
    "load_source",
    "make_batch_dataset",
    "make_batch_iterator",
    "mcq_prompt_messages",
    "mcq_question_text",
    "mcq_to_chat",
    "pack_examples",
    "parse_record",
    "processor_spec_from_config",
    "read_jsonl",
    "read_jsonl_files",
    "real_grids",
    "record_dataset",
    "record_to_json",
    "render_messages",
    "render_with_spans",
    "template_text",
    "write_jsonl",
]

"""MCQ prompts from records (chat template, images) and the greedy MCQ evaluation."""

import numpy as np
import pytest
from flax import nnx

from pathor1_jax.data.chat_template import ASSISTANT_HEADER
from pathor1_jax.data.demo import demo_records
from pathor1_jax.data.pipeline import ProcessorSpec, default_tokenizer_path, get_processor
from pathor1_jax.eval.mcq import evaluate_mcq
from pathor1_jax.models import qwen2_5_vl
from pathor1_jax.rl.prompts import PromptStream, decode_response, mcq_prompt


@pytest.fixture(scope="module")
def processor():
    spec = ProcessorSpec(default_tokenizer_path(), None, 56 * 56, 56 * 56, qwen2_5_vl.tiny_config())
    return get_processor(spec)


def test_mcq_prompt_has_the_image_question_and_assistant_header(processor):
    record = demo_records("mcq", "test")[0]
    prompt = mcq_prompt(processor, record)
    config = qwen2_5_vl.tiny_config()
    header = processor.tokenizer(ASSISTANT_HEADER, add_special_tokens=False)["input_ids"]
    assert prompt.input_ids[-len(header) :].tolist() == header
    assert prompt.answer == record.answer
    n_tokens = int(np.prod(prompt.image_grid_thw, axis=-1).sum()) // config.vision.spatial_merge_size**2
    assert int((prompt.input_ids == config.image_token_id).sum()) == n_tokens
    assert prompt.pixel_values.shape == (int(np.prod(prompt.image_grid_thw, axis=-1).sum()), 1176)
    text = processor.tokenizer.decode(prompt.input_ids.tolist())
    assert record.question in text and all(f"{k}. {v}" in text for k, v in record.options.items())


def test_decode_keeps_think_and_answer_tags(processor):
    text = "<think>brown DAB</think><answer>D</answer>"
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert decode_response(processor, ids) == text


def test_prompt_stream_resumes_and_reshuffles(processor):
    records = demo_records("mcq", "test")[:5]
    stream = PromptStream(records, processor, seed=3, shuffle=True)
    first = [p.input_ids.tobytes() for p in stream(7)]
    state = stream.get_state()
    rest = [p.input_ids.tobytes() for p in stream(4)]
    again = PromptStream(records, processor, seed=3, shuffle=True)
    again.set_state(state)
    assert [p.input_ids.tobytes() for p in again(4)] == rest
    assert sorted(first[:5]) == sorted(mcq_prompt(processor, r).input_ids.tobytes() for r in records)


def test_evaluate_mcq_counts_every_record_once(processor):
    model = qwen2_5_vl.Qwen2_5_VLForConditionalGeneration(qwen2_5_vl.tiny_config(), rngs=nnx.Rngs(0))
    records = demo_records("mcq", "test")[:5]
    result = evaluate_mcq(model, processor, records, batch_size=4, max_new_tokens=4, progress=False)
    assert result.num_examples == 5 and [p["id"] for p in result.predictions] == [r.id for r in records]
    assert 0.0 <= result.accuracy <= 1.0 and 0.0 <= result.format_rate <= 1.0
    # a random tiny model in 4 tokens cannot write both blocks
    assert result.format_rate == 0.0


def test_mcq_breakdown_splits_accuracy_by_question_and_counts_answer_letters():
    from pathor1_jax.eval.demo import mcq_breakdown

    records = demo_records("mcq", "test")[:4]
    questions = [r.id.rsplit("-", 1)[-1] for r in records]
    responses = [
        "<think>x</think><answer>C</answer>",
        "<think>x</think><answer>C</answer>",
        "<think>x</think><answer>A</answer>",
        "no answer block",
    ]
    correct = [True, False, True, False]
    predictions = [{"response": t, "correct": c} for t, c in zip(responses, correct, strict=True)]
    numbers = mcq_breakdown(records, predictions)
    for question in set(questions):
        hits = [c for q, c in zip(questions, correct, strict=True) if q == question]
        assert numbers[f"mcq/accuracy_{question}"] == sum(hits) / len(hits)
    assert set(questions) == {"tissue", "density"}
    assert {k: v for k, v in numbers.items() if "answer_" in k} == {
        "mcq/answer_A": 0.25,
        "mcq/answer_B": 0.0,
        "mcq/answer_C": 0.5,
    }

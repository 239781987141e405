"""MCQ prompts from records (chat template, images) and the greedy MCQ evaluation."""

import numpy as np
import pytest
from flax import nnx

from pathor1_jax.data.chat_template import ASSISTANT_HEADER
from pathor1_jax.data.demo import demo_records
from pathor1_jax.data.pipeline import ProcessorSpec, default_tokenizer_path, get_processor
from pathor1_jax.eval.mcq import evaluate_mcq
from pathor1_jax.models import qwen2_5_vl
from pathor1_jax.rl.prompts import PromptStream, decode_response, mcq_prompt, stratified_order


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


def test_stratified_order_keeps_each_key_in_proportion_in_every_window():
    """60 records of keys a/b/c in shares 1/2, 1/3, 1/6: a permutation, and every run of 6 consecutive
    positions holds each key's share of 6 to within one record; a plain shuffle does not."""
    keys = ["a"] * 30 + ["b"] * 20 + ["c"] * 10
    share = {"a": 3, "b": 2, "c": 1}
    for seed in range(5):
        order = stratified_order(keys, np.random.default_rng(seed))
        assert sorted(order.tolist()) == list(range(60))
        for start in range(60 - 6 + 1):
            window = [keys[i] for i in order[start : start + 6]]
            assert all(abs(window.count(k) - n) <= 1 for k, n in share.items()), (seed, start, window)
    plain = np.random.default_rng(0).permutation(60)
    windows = [[keys[i] for i in plain[s : s + 6]] for s in range(55)]
    assert any(abs(w.count(k) - n) > 1 for w in windows for k, n in share.items())


def test_prompt_stream_stratified_by_question_and_answer(processor):
    """`stratify=True`: the first 6 prompts of the 12 records of 6 (question, answer) pairs hold one of
    each pair (their shares are equal); resuming from a state gives the same prompts."""
    records = demo_records("mcq", "train")
    pairs = {}
    for r in records:
        pairs.setdefault((r.question, r.answer), []).append(r)
    assert len(pairs) == 6
    chosen = [r for group in pairs.values() for r in group[:2]]
    stream = PromptStream(chosen, processor, seed=1, shuffle=True, stratify=True)
    pair_of = {mcq_prompt(processor, r).pixel_values.tobytes(): (r.question, r.answer) for r in chosen}
    first = [pair_of[p.pixel_values.tobytes()] for p in stream(6)]
    assert sorted(first) == sorted(pairs)
    state, rest = stream.get_state(), [p.pixel_values.tobytes() for p in stream(6)]
    again = PromptStream(chosen, processor, seed=1, shuffle=True, stratify=True)
    again.set_state(state)
    assert [p.pixel_values.tobytes() for p in again(6)] == rest


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

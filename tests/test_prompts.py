"""Prompt styles render the literal strings their sources use (Patho-R1's README, VLMEvalKit)."""

import pytest

from pathor1_jax.data.chat_template import render_messages
from pathor1_jax.data.prompts import mcq_prompt_messages, mcq_to_chat, question_messages
from pathor1_jax.data.records import ImageRef, MCQRecord

RECORD = MCQRecord(
    id="q1",
    images=(ImageRef(path="tile.png"),),
    question="What feature is indicative of chronic inflammation?",
    options={"A": "Granuloma formation", "B": "Plasma cells"},
    answer="B",
)
HEAD = "<|vision_start|><|image_pad|><|vision_end|>"


def test_patho_r1_style_is_the_released_inference_prompt():
    text = render_messages(mcq_prompt_messages(RECORD), add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a pathology expert, your task is to answer question step by step. "
        "Use the following format:<think> Your step-by-step reasoning </think><answer> Your final answer "
        "</answer><|im_end|>\n<|im_start|>user\n" + HEAD + "What feature is indicative of chronic "
        "inflammation? /n A. Granuloma formation /n B. Plasma cells<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chain_of_draft_style():
    text = render_messages(mcq_prompt_messages(RECORD, "patho_r1_cod"))
    assert text.startswith(
        "<|im_start|>system\nYou are a pathology expert, your task is to think step by step, but only keep "
        "a minimum draft for each thinking step, with 5 words at most. Return the answer at the end of the "
        "response after a separator. Use the following format:<think> Your step-by-step reasoning "
        "</think><answer> Your final answer </answer><|im_end|>\n"
    )
    assert "inflammation? /n A. Granuloma formation /n B. Plasma cells<|im_end|>" in text


def test_vlmevalkit_style_has_no_system_prompt_of_its_own():
    text = render_messages(mcq_prompt_messages(RECORD, "vlmevalkit"))
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        + HEAD
        + "Question: What feature is indicative of chronic inflammation?\nOptions:\nA. Granuloma formation\n"
        "B. Plasma cells\nPlease select the correct answer from the options above.<|im_end|>\n"
    )


def test_plain_style_and_sft_chat():
    chat = mcq_to_chat(RECORD, "Plasma cells mark chronic inflammation.", "plain")
    text = render_messages(chat.messages)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        + HEAD
        + "What feature is indicative of chronic inflammation?\nA. Granuloma formation\nB. Plasma cells\n"
        "Think step by step inside <think></think>, then give the letter of the correct option inside "
        "<answer></answer>.<|im_end|>\n<|im_start|>assistant\n<think>Plasma cells mark chronic "
        "inflammation.</think><answer>B</answer><|im_end|>\n"
    )


def test_open_question_has_no_options():
    messages = question_messages("Is this an IHC stain?", {}, (), "patho_r1")
    assert messages[-1].content[-1].text == "Is this an IHC stain?"
    assert question_messages("Is it?", {}, (), "vlmevalkit")[-1].content[-1].text == "Question: Is it?"


def test_unknown_style_names_the_styles():
    with pytest.raises(ValueError, match="unknown prompt style 'cot'.*patho_r1"):
        mcq_prompt_messages(RECORD, "cot")

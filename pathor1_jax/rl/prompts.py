"""MCQ records → generation prompts, and the endless, resumable prompt stream of RL training."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pathor1_jax.data.processing import QwenVLProcessor
from pathor1_jax.data.prompts import DEFAULT_PROMPT_STYLE
from pathor1_jax.data.records import MCQRecord
from pathor1_jax.rl.rollout import Prompt


def mcq_prompt(processor: QwenVLProcessor, record: MCQRecord, style: str = DEFAULT_PROMPT_STYLE) -> Prompt:
    """The generation prompt of an MCQ in prompt `style` (`QwenVLProcessor.encode_prompt`: the
    chat-templated prompt turns, images expanded to their image-pad tokens, the assistant header)."""
    example = processor.encode_prompt(record, style=style)
    has_images = len(example["image_grid_thw"]) > 0
    return Prompt(
        input_ids=example["input_ids"],
        answer=record.answer,
        pixel_values=example["pixel_values"] if has_images else None,
        image_grid_thw=example["image_grid_thw"] if has_images else None,
    )


def decode_response(processor: QwenVLProcessor, ids: Sequence[int]) -> str:
    """Response text with `<think>`/`<answer>` kept (special tokens are not skipped)."""
    return processor.tokenizer.decode(list(ids), skip_special_tokens=False)


class PromptStream:
    """MCQ prompts in a reshuffled order every epoch, forever; `get_state`/`set_state` resume it.

    Prompts are encoded in prompt `style` on first use and cached (the records hold only image
    references).
    """

    def __init__(
        self,
        records: Sequence[MCQRecord],
        processor: QwenVLProcessor,
        *,
        seed: int,
        shuffle: bool,
        style: str = DEFAULT_PROMPT_STYLE,
    ):
        if not records:
            raise ValueError("the RL prompt stream needs at least one MCQ record")
        self.records = records
        self.processor = processor
        self.seed = seed
        self.shuffle = shuffle
        self.style = style
        self.position = 0  # prompts handed out so far
        self._cache: dict[int, Prompt] = {}
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, permutation)

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.records))
        if not self.shuffle:
            return offset
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng((self.seed, epoch)).permutation(len(self.records)))
        return int(self._order[1][offset])

    def __call__(self, num_prompts: int) -> list[Prompt]:
        out = []
        for _ in range(num_prompts):
            i = self._index(self.position)
            if i not in self._cache:
                self._cache[i] = mcq_prompt(self.processor, self.records[i], self.style)
            out.append(self._cache[i])
            self.position += 1
        return out

    def get_state(self) -> dict:
        return {"position": self.position}

    def set_state(self, state: dict) -> None:
        self.position = int(state["position"])

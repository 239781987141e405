"""MCQ records → generation prompts, and the endless, resumable prompt stream of RL training."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from pathor1_jax.data.images import BadImageError
from pathor1_jax.data.pipeline import Dropped, prescan
from pathor1_jax.data.processing import QwenVLProcessor
from pathor1_jax.data.prompts import DEFAULT_PROMPT_STYLE
from pathor1_jax.data.records import MCQRecord
from pathor1_jax.errors import UserError
from pathor1_jax.rl.rollout import Prompt

log = logging.getLogger(__name__)


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


def stratified_order(keys: Sequence, rng: np.random.Generator) -> np.ndarray:
    """A random permutation of `range(len(keys))` in which every run of consecutive positions holds
    each key's records in proportion to its share (to within one record): each key's records are
    shuffled, the j-th of a key with n records is placed at (j + u) / n with one u ~ U[0, 1) per key,
    and all are sorted by place (ties broken at random). A batch cut from it then has about the mix
    of the whole set, not the swing of a plain shuffle's draw."""
    keys = list(keys)
    groups: dict = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    index, place = [], []
    for members in groups.values():
        members = rng.permutation(members)
        index.extend(members.tolist())
        place.extend(((np.arange(len(members)) + rng.random()) / len(members)).tolist())
    ties = rng.random(len(index))
    return np.asarray(index)[np.lexsort((ties, np.asarray(place)))]


class PromptStream:
    """MCQ prompts in a reshuffled order every epoch, forever; `get_state`/`set_state` resume it.

    Prompts are encoded in prompt `style` on first use and cached (the records hold only image
    references). A record whose image is bad raises its `BadImageError`, or with
    `on_bad_image="skip"` is skipped (and counted in `skipped`); a whole epoch of unusable records is
    an error, as is an empty source. A sample of the records is encoded at construction
    (`pipeline.prescan`), so that bad data fails before training starts. With `stratify`, each epoch's
    order is `stratified_order` over the records' (question, answer) pairs: every step's prompts mix
    the kinds of question and the right answers as the whole set does.
    """

    def __init__(
        self,
        records: Sequence[MCQRecord],
        processor: QwenVLProcessor,
        *,
        seed: int,
        shuffle: bool,
        stratify: bool = False,
        style: str = DEFAULT_PROMPT_STYLE,
        on_bad_image: str = "error",
    ):
        self.records = records
        self.processor = processor
        self.seed = seed
        self.shuffle = shuffle
        self.stratify = stratify
        self.style = style
        self.on_bad_image = on_bad_image
        self.position = 0  # prompts handed out so far, skipped records included
        self.skipped = 0
        self._cache: dict[int, Prompt | Dropped] = {}
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, permutation)
        prescan(records, self._encode, what=f"data ({len(records)} MCQ records)")

    def _encode(self, record: MCQRecord) -> Prompt | Dropped:
        try:
            return mcq_prompt(self.processor, record, self.style)
        except BadImageError as e:
            if self.on_bad_image != "skip":
                raise
            return Dropped.bad_image(record.id, e)

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.records))
        if not self.shuffle:
            return offset
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng((self.seed, epoch))
            if self.stratify:
                order = stratified_order([(r.question, r.answer) for r in self.records], rng)
            else:
                order = rng.permutation(len(self.records))
            self._order = (epoch, order)
        return int(self._order[1][offset])

    def __call__(self, num_prompts: int) -> list[Prompt]:
        out: list[Prompt] = []
        in_a_row = 0
        while len(out) < num_prompts:
            i = self._index(self.position)
            self.position += 1
            if i not in self._cache:
                self._cache[i] = self._encode(self.records[i])
            prompt = self._cache[i]
            if not isinstance(prompt, Dropped):
                out.append(prompt)
                in_a_row = 0
                continue
            self.skipped += 1
            in_a_row += 1
            log.warning(
                "skipped record %r: %s (%d skipped so far)", prompt.record_id, prompt.reason, self.skipped
            )
            if in_a_row > len(self.records):
                raise UserError(f"data: none of the {len(self.records)} MCQ records can be used")
        return out

    def get_state(self) -> dict:
        return {"position": self.position}

    def set_state(self, state: dict) -> None:
        self.position = int(state["position"])

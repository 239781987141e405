"""Rollouts: G sampled responses per MCQ prompt from the old policy, with their images, lengths,
rewards and per-token log-probs.

Host side (numpy): prompts are left-padded and repeated G times (responses of a prompt are
contiguous, so row r belongs to prompt r // G), each repeat carrying its prompt's image patches;
responses are cut at the first EOS (the EOS token itself is part of the response and is trained on);
rewards are computed on the decoded text. Device side: `qwen2_5_vl.generate_prepared` samples, and
`response_logprobs` scores the responses in one forward pass of the whole sequence.

Across processes every process holds the whole rollout on the host (prompts, responses, rewards:
the same decisions everywhere) but feeds the devices only its own rows (`multihost.local_rows`)
and their image patches: each process's patches form one block of the global patch array, padded
to the same size and split over the batch axes like the rows (never replicated).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from functools import partial

import jax
import numpy as np
from flax import nnx

from pathor1_jax.kernels.policy_loss import token_logprobs
from pathor1_jax.logical import current_rules
from pathor1_jax.models import qwen2_5_vl
from pathor1_jax.models.qwen2_5_vl import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from pathor1_jax.rl import rewards as rl_rewards
from pathor1_jax.sharding.multihost import local_batch_devices, local_rows, to_global, to_host
from pathor1_jax.train.lm import offset_to_block


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One chat-templated MCQ prompt (ending with the assistant turn's opening) and its ground truth."""

    input_ids: np.ndarray  # [P_i] int32
    answer: str  # ground-truth option letter
    pixel_values: np.ndarray | None = None  # [N_patches_i, 1176] flattened patches
    image_grid_thw: np.ndarray | None = None  # [N_images_i, 3]

    @property
    def num_patches(self) -> int:
        return 0 if self.pixel_values is None else int(self.pixel_values.shape[0])


@dataclasses.dataclass
class Rollout:
    """N prompts × G responses. Rows are samples (B = N·G); row r belongs to prompt r // G."""

    prompts: list[Prompt]
    group_size: int
    prompt_ids: np.ndarray  # [B, P] left-padded
    prompt_mask: np.ndarray  # [B, P]
    responses: np.ndarray  # [B, R] sampled ids, pad after EOS
    response_mask: np.ndarray  # [B, R] 1 up to and including the first EOS
    lengths: np.ndarray  # [B] response tokens (EOS included)
    truncated: np.ndarray  # [B] bool: no EOS within R tokens
    texts: list[str]  # [B] decoded responses without the EOS
    rewards: np.ndarray  # [N, G]
    correct: np.ndarray  # [N, G] bool, accuracy reward == 1
    formatted: np.ndarray  # [N, G] bool, format reward == 1
    old_logprobs: np.ndarray | None = None  # [B, R] π_old per response token (0 on padding)
    ref_logprobs: np.ndarray | None = None  # [B, R] π_ref per response token (GRPO's KL)

    @property
    def num_groups(self) -> int:
        return len(self.prompts)

    def select_groups(self, groups: Sequence[int]) -> Rollout:
        """A Rollout of the given prompt groups, in that order (dynamic sampling keeps a subset)."""
        g = self.group_size
        rows = np.concatenate([np.arange(i * g, (i + 1) * g) for i in groups]) if groups else np.zeros(0, int)
        take = lambda a: None if a is None else a[rows]  # noqa: E731
        return Rollout(
            prompts=[self.prompts[i] for i in groups],
            group_size=g,
            prompt_ids=self.prompt_ids[rows],
            prompt_mask=self.prompt_mask[rows],
            responses=self.responses[rows],
            response_mask=self.response_mask[rows],
            lengths=self.lengths[rows],
            truncated=self.truncated[rows],
            texts=[self.texts[r] for r in rows],
            rewards=self.rewards[list(groups)],
            correct=self.correct[list(groups)],
            formatted=self.formatted[list(groups)],
            old_logprobs=take(self.old_logprobs),
            ref_logprobs=take(self.ref_logprobs),
        )


def concat_rollouts(parts: Sequence[Rollout], pad_token_id: int) -> Rollout:
    """Groups of several rollouts (same G and response length) as one; prompts re-padded to one P."""
    if len(parts) == 1:
        return parts[0]
    p = max(r.prompt_ids.shape[1] for r in parts)

    def left_pad(a, value):
        return np.pad(a, ((0, 0), (p - a.shape[1], 0)), constant_values=value)

    def cat(name):
        values = [getattr(r, name) for r in parts]
        return None if any(v is None for v in values) else np.concatenate(values)

    return Rollout(
        prompts=[q for r in parts for q in r.prompts],
        group_size=parts[0].group_size,
        prompt_ids=np.concatenate([left_pad(r.prompt_ids, pad_token_id) for r in parts]),
        prompt_mask=np.concatenate([left_pad(r.prompt_mask, 0) for r in parts]),
        responses=cat("responses"),
        response_mask=cat("response_mask"),
        lengths=cat("lengths"),
        truncated=cat("truncated"),
        texts=[t for r in parts for t in r.texts],
        rewards=cat("rewards"),
        correct=cat("correct"),
        formatted=cat("formatted"),
        old_logprobs=cat("old_logprobs"),
        ref_logprobs=cat("ref_logprobs"),
    )


def special_ids(
    config: Qwen2_5_VLConfig, eos_token_id: int | None = None, pad_token_id: int | None = None
) -> tuple[int, int]:
    """(eos, pad) ids: the given ones, else the config's; pad falls back to eos (as `generate`)."""
    eos = config.text.eos_token_id if eos_token_id is None else eos_token_id
    pad = pad_token_id if pad_token_id is not None else config.text.pad_token_id
    return int(eos), int(eos if pad is None else pad)


def pad_prompts(
    prompts: Sequence[Prompt], repeat: int, pad_token_id: int, length: int = 0, multiple: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded ids and mask `[len(prompts) · repeat, P]`, each prompt repeated `repeat` times.

    P = `length` when given (one compiled shape for every batch; longer prompts are an error), else
    the longest prompt rounded up to `multiple` (few distinct shapes).
    """
    longest = max(len(q.input_ids) for q in prompts)
    if length and longest > length:
        raise ValueError(f"a prompt has {longest} tokens, more than the configured prompt length {length}")
    p = length or -(-longest // multiple) * multiple
    ids = np.full((len(prompts) * repeat, p), pad_token_id, np.int32)
    mask = np.zeros_like(ids)
    for i, q in enumerate(prompts):
        n = len(q.input_ids)
        ids[i * repeat : (i + 1) * repeat, p - n :] = q.input_ids
        mask[i * repeat : (i + 1) * repeat, p - n :] = 1
    return ids, mask


def sample_images(
    prompts: Sequence[Prompt], rows: np.ndarray, group_size: int
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Image patches `[Σ N_patches, 1176]` and grids `[Σ N_images, 3]` of the given sample rows, in row
    order (row r shows the images of prompt r // group_size); None when no row has an image."""
    owners = [prompts[r // group_size] for r in rows]
    with_images = [q for q in owners if q.pixel_values is not None]
    if not with_images:
        return None, None
    pixels = np.concatenate([q.pixel_values for q in with_images])
    grids = np.concatenate([np.asarray(q.image_grid_thw).reshape(-1, 3) for q in with_images])
    return pixels, grids


def response_lengths(responses: np.ndarray, eos_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens up to and including the first EOS per row `[B]`, and whether a row never ended."""
    is_eos = responses == eos_token_id
    ended = is_eos.any(axis=1)
    lengths = np.where(ended, is_eos.argmax(axis=1) + 1, responses.shape[1]).astype(np.int32)
    return lengths, ~ended


def score(
    texts: Sequence[str],
    answers: Sequence[str],
    lengths: np.ndarray,
    reward_fn: Callable[[str, str, int], float],
    group_size: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rewards, correctness and format flags `[N, G]` of B = N·G responses (answer of row r: r // G)."""
    b = len(texts)
    r = np.array([reward_fn(texts[i], answers[i // group_size], int(lengths[i])) for i in range(b)])
    correct = np.array(
        [rl_rewards.accuracy_reward(texts[i], answers[i // group_size]) == 1.0 for i in range(b)]
    )
    formatted = np.array([rl_rewards.format_reward(t) == 1.0 for t in texts])
    shape = (b // group_size, group_size)
    return r.reshape(shape).astype(np.float32), correct.reshape(shape), formatted.reshape(shape)


def rollout(
    model: Qwen2_5_VLForConditionalGeneration,
    prompts: Sequence[Prompt],
    *,
    group_size: int,
    max_new_tokens: int,
    decode: Callable[[Sequence[int]], str],
    reward_fn: Callable[[str, str, int], float],
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    prompt_len: int = 0,
) -> Rollout:
    """Sample `group_size` responses per prompt with the KV-cache generator and score them.

    `decode(ids)` turns response ids (EOS excluded) into text, keeping `<think>`/`<answer>` (decode
    without skipping special tokens); `reward_fn(text, answer, num_tokens)` is the RL reward.
    Log-probs are filled in separately (`fill_logprobs`), once per rollout batch. `prompt_len`: see
    `pad_prompts`.
    """
    eos, pad = special_ids(model.config, eos_token_id, pad_token_id)
    prompts = list(prompts)
    ids, mask = pad_prompts(prompts, group_size, pad, prompt_len)
    rows = np.arange(len(ids))
    part, block, _ = local_rows(len(rows))
    unit = model.config.vision.spatial_merge_size**2
    num_patches = block_patches(prompts, [rows], group_size, unit)
    inputs = device_inputs(
        model.config, ids[part], mask[part], prompts, rows[part], group_size, num_patches, block
    )
    responses = to_host(
        qwen2_5_vl.generate_prepared(
            model,
            inputs["input_ids"],
            inputs["segment_ids"],
            inputs["position_ids"],
            inputs["pixel_values"],
            inputs["vision_index"],
            inputs["image_feature_index"],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            eos_token_id=eos,
            pad_token_id=pad,
        )
    )
    lengths, truncated = response_lengths(responses, eos)
    response_mask = (np.arange(responses.shape[1])[None, :] < lengths[:, None]).astype(np.int32)
    texts = [
        decode(responses[i, : lengths[i] - (0 if truncated[i] else 1)].tolist()) for i in range(len(ids))
    ]
    rewards, correct, formatted = score(texts, [q.answer for q in prompts], lengths, reward_fn, group_size)
    return Rollout(
        prompts=prompts,
        group_size=group_size,
        prompt_ids=ids,
        prompt_mask=mask,
        responses=responses,
        response_mask=response_mask,
        lengths=lengths,
        truncated=truncated,
        texts=texts,
        rewards=rewards,
        correct=correct,
        formatted=formatted,
    )


def block_patches(
    prompts: Sequence[Prompt], row_sets: Sequence[np.ndarray], group_size: int, merge_unit: int
) -> int | None:
    """Image patches per process block, the same for all (row r shows the images of prompt
    r // group_size; each process feeds its block of every row set): the most any block of any row
    set needs, in whole merge groups split evenly over a process's devices. None without images."""
    needed = [
        sum(prompts[r // group_size].num_patches for r in part)
        for rows in row_sets
        for part in np.split(rows, local_rows(len(rows))[2])
    ]
    if not any(needed):
        return None
    ctx = current_rules()
    unit = merge_unit * (1 if ctx is None else local_batch_devices(*ctx))
    return -(-max(needed) // unit) * unit


def device_inputs(
    config: Qwen2_5_VLConfig,
    ids: np.ndarray,
    mask: np.ndarray,
    prompts: Sequence[Prompt],
    rows: np.ndarray,
    group_size: int,
    num_patches: int | None,
    block: int,
) -> dict:
    """Model inputs of this process's rows `rows` of a batch, block `block` of it (`ids`/`mask`
    `[b, T]`; row r shows the images of prompt r // group_size, in its image-pad tokens), as arrays
    of the global batch: M-RoPE positions with images, 1D `cumsum(mask) − 1` for text only; the
    rows' patches zero-padded to `num_patches` (see `block_patches`) and numbered as the block's."""
    out = {"input_ids": to_global(ids), "segment_ids": to_global(mask)}
    if num_patches is None:  # no image in the whole batch
        positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0) * mask
        position_ids = np.broadcast_to(positions, (3, *ids.shape)).astype(np.int32)
        return {**out, "position_ids": to_global(position_ids, axis=1), "pixel_values": None,
                "vision_index": None, "image_feature_index": None}  # fmt: skip
    pixels, grids = sample_images(prompts, rows, group_size)
    if pixels is None:  # this block shows no image, others do
        pixels, grids = np.zeros((0, config.vision.patch_dim), np.float32), np.zeros((0, 3), np.int64)
    is_image = ids == config.image_token_id
    prepared = qwen2_5_vl.prepare_inputs(
        config, ids, mask, grids if len(grids) else None, is_image.astype(np.int32), num_patches
    )
    order = np.cumsum(is_image.reshape(-1)).reshape(is_image.shape) - 1
    local = offset_to_block(
        {
            "pixel_values": np.pad(pixels, ((0, num_patches - len(pixels)), (0, 0))),
            "vision_index": qwen2_5_vl.vision_index(grids, config.vision, num_patches),
            "image_feature_index": np.where(is_image, order, -1).astype(np.int32),
        },
        block,
        config.vision.spatial_merge_size**2,
    )
    return {
        **out,
        "position_ids": to_global(np.asarray(prepared["position_ids"], np.int32), axis=1),
        "pixel_values": to_global(local["pixel_values"]),
        "vision_index": to_global(local["vision_index"]),
        "image_feature_index": to_global(local["image_feature_index"]),
    }


def sequence_inputs(
    config: Qwen2_5_VLConfig, batch: Rollout, rows: np.ndarray, num_patches: int | None
) -> dict:
    """Model inputs of the full sequences (prompt + response) of the row set `rows`, this process's
    rows of it fed to the devices (see `device_inputs`; `num_patches` from `block_patches`).

    Positions follow `generate` so the scored log-probs are those of the sampling policy. Image-pad
    ids sampled inside a response are fed as pad ids (the vision tower fills image-pad slots of the
    prompt only; targets are untouched).
    """
    part, block, _ = local_rows(len(rows))
    mine = rows[part]
    _, pad = special_ids(config)
    responses = batch.responses[mine]
    response_inputs = np.where(responses == config.image_token_id, pad, responses)
    ids = np.concatenate([batch.prompt_ids[mine], response_inputs], axis=1).astype(np.int32)
    mask = np.concatenate([batch.prompt_mask[mine], batch.response_mask[mine]], axis=1).astype(np.int32)
    inputs = device_inputs(config, ids, mask, batch.prompts, mine, batch.group_size, num_patches, block)
    return {
        **inputs,
        "targets": to_global(responses.astype(np.int32)),
        "response_mask": to_global(batch.response_mask[mine].astype(np.int32)),
    }


def response_hidden(model: Qwen2_5_VLForConditionalGeneration, inputs: dict) -> jax.Array:
    """Final hidden states `[B, R, D]` at the positions that predict each response token."""
    hidden = model.hidden_states(
        inputs["input_ids"],
        pixel_values=inputs["pixel_values"],
        position_ids=inputs["position_ids"],
        segment_ids=inputs["segment_ids"],
        vision_index=inputs["vision_index"],
        image_feature_index=inputs["image_feature_index"],
    )  # [B, P + R, D]
    r = inputs["targets"].shape[1]
    return hidden[:, -r - 1 : -1]


@partial(nnx.jit, static_argnames=("impl", "temperature"))
def response_logprobs(
    model: Qwen2_5_VLForConditionalGeneration, inputs: dict, impl: str = "auto", temperature: float = 1.0
) -> jax.Array:
    """log π(o_t | v, o_<t) `[B, R]` of the response tokens (0 on padding) under the sampling
    distribution softmax(logits / temperature), no gradient."""
    hidden = response_hidden(model, inputs)
    logprobs = token_logprobs(
        hidden,
        model.lm_head_kernel(),
        inputs["targets"],
        temperature=temperature,
        impl=impl,
        valid=inputs["response_mask"] > 0,
    )
    return jax.lax.stop_gradient(logprobs)


def minibatch_rows(num_groups: int, group_size: int, groups_per_minibatch: int) -> list[np.ndarray]:
    """Sample rows of consecutive mini-batches of whole groups."""
    if num_groups % groups_per_minibatch:
        raise ValueError(f"{num_groups} groups do not split into mini-batches of {groups_per_minibatch}")
    g = group_size
    return [
        np.arange(start * g, (start + groups_per_minibatch) * g)
        for start in range(0, num_groups, groups_per_minibatch)
    ]


def fill_logprobs(
    model: Qwen2_5_VLForConditionalGeneration,
    batch: Rollout,
    groups_per_minibatch: int,
    *,
    reference: Qwen2_5_VLForConditionalGeneration | None = None,
    impl: str = "auto",
    temperature: float = 1.0,
) -> Rollout:
    """Store π_old (and π_ref when a reference model is given) log-probs of every response token, at
    the rollout's sampling `temperature`."""
    row_sets = minibatch_rows(batch.num_groups, batch.group_size, groups_per_minibatch)
    unit = model.config.vision.spatial_merge_size**2
    num_patches = block_patches(batch.prompts, row_sets, batch.group_size, unit)
    old, ref = [], []
    for rows in row_sets:
        inputs = sequence_inputs(model.config, batch, rows, num_patches)
        old.append(to_host(response_logprobs(model, inputs, impl=impl, temperature=temperature)))
        if reference is not None:
            ref.append(to_host(response_logprobs(reference, inputs, impl=impl, temperature=temperature)))
    batch.old_logprobs = np.concatenate(old)
    batch.ref_logprobs = np.concatenate(ref) if reference is not None else None
    return batch

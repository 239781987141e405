"""One GRPO / DAPO step: rollout (with DAPO's dynamic sampling), advantages, π_old / π_ref log-probs
once per rollout batch, then μ passes of jitted policy updates over mini-batches of whole groups.

No update ever runs on a mini-batch without a response token: AdamW would still move every weight
(by ≈0.67·lr after one real step) on momentum alone. When DAPO's dynamic sampling runs out of rounds
before the batch is full, `short_batch` decides: "error" (the default, as verl and EasyR1) stops the
run with a `ShortBatchError` naming the counts; "train" trains on the groups it kept, padded with
token-less groups only up to whole mini-batches.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pathor1_jax.errors import Pathor1Error
from pathor1_jax.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from pathor1_jax.rl.advantages import ADVANTAGE_STDS, group_advantages
from pathor1_jax.rl.dynamic_sampling import SamplingReport, fill_batch
from pathor1_jax.rl.losses import AGG_MODES, dapo_loss, grpo_loss
from pathor1_jax.rl.rollout import (
    Prompt,
    Rollout,
    block_patches,
    concat_rollouts,
    fill_logprobs,
    minibatch_rows,
    response_hidden,
    sequence_inputs,
)
from pathor1_jax.sharding.multihost import local_rows, to_global
from pathor1_jax.train.step import StepSpec, apply_gradients, zero_frozen

SHORT_BATCH = ("error", "train")
# The aggregation each equation writes: Eq. 1 averages per response, Eq. 2 per group.
PAPER_AGG = {"grpo": "seq-mean-token-mean", "dapo": "group-mean-token-mean"}


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The static (hashable) settings of the policy loss and its advantages."""

    algo: str  # "grpo" (Eq. 1) or "dapo" (Eq. 2)
    group_size: int
    epsilon: float = 0.2  # GRPO's symmetric clip
    beta: float = 0.04  # GRPO's KL coefficient
    eps_low: float = 0.2  # DAPO clip-higher
    eps_high: float = 0.28
    agg: str = ""  # one of AGG_MODES; "" = the paper's (PAPER_AGG)
    dual_clip: float | None = None  # c > 1 for negative advantages (verl: 3.0); None = off (the paper)
    advantage_std: str = "population"  # or "unbiased" (verl, EasyR1)
    temperature: float = 1.0  # the rollout's: log-probs are of softmax(logits / T)
    impl: str = "auto"  # policy-loss kernel: "auto", "pallas", "chunked" or the jnp reference "xla"

    def __post_init__(self):
        if self.algo not in ("grpo", "dapo"):
            raise ValueError(f"rl algo must be 'grpo' or 'dapo', got {self.algo!r}")
        if self.agg and self.agg not in AGG_MODES:
            raise ValueError(f"rl loss aggregation must be one of {AGG_MODES}, got {self.agg!r}")
        if self.advantage_std not in ADVANTAGE_STDS:
            raise ValueError(f"rl advantage std must be one of {ADVANTAGE_STDS}, got {self.advantage_std!r}")
        if self.dual_clip is not None and not self.dual_clip > 1.0:
            raise ValueError(f"rl dual clip must be > 1 (or off), got {self.dual_clip}")
        if not self.temperature > 0:
            raise ValueError(
                f"rl temperature must be > 0 (log-probs are of softmax(logits / T)), got {self.temperature}"
            )

    @property
    def aggregation(self) -> str:
        return self.agg or PAPER_AGG[self.algo]


class ShortBatchError(Pathor1Error):
    """Dynamic sampling ran out of rounds before the batch was full (with `short_batch="error"`);
    `metrics` are the step's metrics up to the rollouts, for the run's log."""

    def __init__(self, message: str, metrics: dict[str, float]):
        super().__init__(message)
        self.metrics = metrics


def policy_loss(
    model: Qwen2_5_VLForConditionalGeneration,
    inputs: dict,
    old_logprobs: jax.Array,
    advantages: jax.Array,
    ref_logprobs: jax.Array | None,
    cfg: LossConfig,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The loss of one mini-batch (inputs from `sequence_inputs`), advantages `[B]`."""
    hidden = response_hidden(model, inputs)  # [B, R, D]
    args = (
        hidden,
        model.lm_head_kernel(),
        inputs["targets"],
        old_logprobs,
        advantages,
        inputs["response_mask"],
    )
    common = dict(
        group_size=cfg.group_size,
        agg=cfg.aggregation,
        dual_clip=cfg.dual_clip,
        temperature=cfg.temperature,
        impl=cfg.impl,
    )
    if cfg.algo == "grpo":
        return grpo_loss(*args, ref_logprobs, epsilon=cfg.epsilon, beta=cfg.beta, **common)
    return dapo_loss(*args, eps_low=cfg.eps_low, eps_high=cfg.eps_high, **common)


def update(
    spec: StepSpec,
    cfg: LossConfig,
    state: dict,
    inputs: dict,
    old_logprobs: jax.Array,
    advantages: jax.Array,
    ref_logprobs: jax.Array | None,
) -> tuple[dict, dict[str, jax.Array]]:
    """One optimizer update of the trainer's state dict (see `pathor1_jax.train.step`) on one
    mini-batch; returns the new state and the loss, the kernel's metrics and the gradient norm."""

    def loss_fn(params):
        return policy_loss(
            nnx.merge(spec.graphdef, params), inputs, old_logprobs, advantages, ref_logprobs, cfg
        )

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    new_state, update_metrics = apply_gradients(spec, state, zero_frozen(grads, spec.freeze), loss)
    return new_state, {"loss": loss, **metrics, **update_metrics}


jit_update = jax.jit(update, static_argnums=(0, 1), donate_argnums=2)


def pad_groups(batch: Rollout, num_groups: int) -> tuple[Rollout, np.ndarray]:
    """Fill a short batch up to `num_groups` with copies of its groups whose response masks are zero
    (no tokens: no loss, no gradient, not counted by any aggregation). Returns it and the real-group
    flags."""
    n = batch.num_groups
    if n == 0 or n >= num_groups:
        return batch, np.ones(n, bool)
    order = [i % n for i in range(num_groups)]
    padded = batch.select_groups(order)
    real_rows = np.arange(num_groups * batch.group_size) < n * batch.group_size
    padded.response_mask = padded.response_mask * real_rows[:, None]
    return padded, np.arange(num_groups) < n


def collect_rollouts(
    sample: Callable[[int], Rollout],
    *,
    algo: str,
    group_size: int,
    batch_groups: int,
    max_rounds: int,
    pad_token_id: int,
) -> tuple[Rollout | None, list[Rollout], SamplingReport | None]:
    """GRPO: one rollout of `batch_groups` prompts. DAPO: dynamic sampling (`fill_batch`) over rounds
    of `batch_groups` prompts. Returns the training batch (None when no group survived), every
    sampled rollout (for the metrics) and the sampling report (DAPO only)."""
    if algo == "grpo":
        batch = sample(batch_groups)
        return batch, [batch], None
    sampled: list[Rollout] = []

    def sample_groups(num_prompts: int) -> list[tuple[Rollout, int]]:
        part = sample(num_prompts)
        sampled.append(part)
        return [(part, i) for i in range(part.num_groups)]

    kept, report = fill_batch(
        sample_groups,
        lambda group: int(group[0].correct[group[1]].sum()),
        batch_groups=batch_groups,
        group_size=group_size,
        max_rounds=max_rounds,
    )
    if not kept:
        return None, sampled, report
    parts = [part.select_groups([i for p, i in kept if p is part]) for part in sampled]
    batch = concat_rollouts([p for p in parts if p.num_groups], pad_token_id)
    return batch, sampled, report


@dataclasses.dataclass
class RolloutSampler:
    """`(model, num_prompts) → Rollout` over an endless prompt source; one call = one sampling round
    with its own seed (`seed` counts rounds, so it is the sampler's whole resumable state)."""

    next_prompts: Callable[[int], Sequence[Prompt]]
    rollout_fn: Callable[[Qwen2_5_VLForConditionalGeneration, Sequence[Prompt], int], Rollout]
    seed: int = 0

    def __call__(self, model: Qwen2_5_VLForConditionalGeneration, num_prompts: int) -> Rollout:
        self.seed += 1
        return self.rollout_fn(model, self.next_prompts(num_prompts), self.seed)


def rollout_metrics(sampled: Sequence[Rollout], max_new_tokens: int) -> dict[str, float]:
    """Reward, accuracy, format rate and length statistics over every sampled response."""
    rewards = np.concatenate([r.rewards.reshape(-1) for r in sampled])
    lengths = np.concatenate([r.lengths for r in sampled])
    return {
        "reward/mean": float(rewards.mean()),
        "reward/accuracy": float(np.concatenate([r.correct.reshape(-1) for r in sampled]).mean()),
        "reward/format_rate": float(np.concatenate([r.formatted.reshape(-1) for r in sampled]).mean()),
        "response/mean_length": float(lengths.mean()),
        "response/max_length": float(lengths.max()),
        "response/overlong_fraction": float(np.concatenate([r.truncated for r in sampled]).mean()),
        "response/max_new_tokens": float(max_new_tokens),
    }


def short_batch_message(report: SamplingReport, batch_groups: int, max_rounds: int) -> str:
    return (
        f"DAPO dynamic sampling kept {report.groups_kept} of {batch_groups} groups after {report.rounds} "
        f"rounds (rl.max_rounds={max_rounds}): {report.groups_sampled} prompts drawn, "
        f"{report.groups_filtered} groups all-correct or all-wrong; raise rl.max_rounds, or set "
        "rl.short_batch=train to train on short batches"
    )


def apply_updates(
    spec: StepSpec,
    cfg: LossConfig,
    state: dict,
    batch: Rollout,
    advantages: np.ndarray,
    row_sets: Sequence[np.ndarray],
    inputs: Sequence[dict],
    mu: int,
) -> tuple[dict, list[dict[str, jax.Array]], int]:
    """μ passes of `jit_update` over the mini-batches (`row_sets`, `inputs` from `sequence_inputs`),
    skipping every mini-batch without a response token (padding only). Returns the new state, the
    updates' metrics and the number of mini-batches skipped."""
    history: list[dict[str, jax.Array]] = []
    skipped = 0
    for _ in range(mu):
        for rows, mb in zip(row_sets, inputs, strict=True):
            if not batch.response_mask[rows].any():
                skipped += 1
                continue
            mine = rows[local_rows(len(rows))[0]]  # this process's rows, fed to its devices
            ref = None if batch.ref_logprobs is None else to_global(batch.ref_logprobs[mine])
            state, m = jit_update(
                spec,
                cfg,
                state,
                mb,
                to_global(batch.old_logprobs[mine]),
                to_global(advantages[mine].astype(np.float32)),
                ref,
            )
            history.append(m)
    return state, history, skipped


def rl_step(
    spec: StepSpec,
    state: dict,
    sample: Callable[[Qwen2_5_VLForConditionalGeneration, int], Rollout],
    cfg: LossConfig,
    *,
    batch_groups: int,
    groups_per_minibatch: int,
    mu: int,
    max_rounds: int,
    max_new_tokens: int,
    pad_token_id: int,
    reference: Qwen2_5_VLForConditionalGeneration | None = None,
    short_batch: str = "error",
) -> tuple[dict, dict[str, float]]:
    """Rollout → advantages → old/ref log-probs → μ passes over the mini-batches.

    `sample(model, num_prompts)` rolls out the policy, built here from `state` (the state is donated
    to the updates, so the models built from it live only until they start). `reference` is
    GRPO's frozen model (None for DAPO or β = 0). `short_batch`: see the module doc. Returns the new
    state and the step's metrics; raises `ShortBatchError` for a short batch under "error".
    """
    if short_batch not in SHORT_BATCH:
        raise ValueError(f"short_batch must be one of {SHORT_BATCH}, got {short_batch!r}")
    model = nnx.merge(spec.graphdef, state["params"])
    t0 = time.perf_counter()
    batch, sampled, report = collect_rollouts(
        partial(sample, model),
        algo=cfg.algo,
        group_size=cfg.group_size,
        batch_groups=batch_groups,
        max_rounds=max_rounds,
        pad_token_id=pad_token_id,
    )
    t1 = time.perf_counter()
    metrics = rollout_metrics(sampled, max_new_tokens)
    metrics.update(report.metrics() if report is not None else {"dynamic_sampling/filtered_fraction": 0.0})
    short = report is not None and not report.batch_full
    metrics["dynamic_sampling/short_batch"] = float(short)
    metrics["time/rollout_s"] = t1 - t0
    if short and short_batch == "error":
        raise ShortBatchError(short_batch_message(report, batch_groups, max_rounds), metrics)
    if batch is None:
        metrics.update({"time/logprobs_s": 0.0, "time/update_s": 0.0, "update/skipped": 1.0})
        return state, metrics
    advantages = np.asarray(group_advantages(jnp.asarray(batch.rewards), std=cfg.advantage_std)).reshape(-1)
    whole = -(-batch.num_groups // groups_per_minibatch) * groups_per_minibatch  # whole mini-batches
    batch, real = pad_groups(batch, whole)
    advantages = np.resize(advantages, batch.num_groups * batch.group_size) * np.repeat(
        real, batch.group_size
    )
    fill_logprobs(
        model,
        batch,
        groups_per_minibatch,
        reference=reference if cfg.algo == "grpo" and cfg.beta != 0.0 else None,
        impl=cfg.impl,
        temperature=cfg.temperature,
    )
    t2 = time.perf_counter()
    row_sets = minibatch_rows(batch.num_groups, batch.group_size, groups_per_minibatch)
    unit = model.config.vision.spatial_merge_size**2
    num_patches = block_patches(batch.prompts, row_sets, batch.group_size, unit)
    inputs = [sequence_inputs(model.config, batch, rows, num_patches) for rows in row_sets]
    state, history, skipped = apply_updates(spec, cfg, state, batch, advantages, row_sets, inputs, mu)
    history = jax.device_get(history)
    t3 = time.perf_counter()
    for key in history[0] if history else ():
        name = "loss" if key == "loss" else f"update/{key}"  # "loss": the trainer's (and demo plot's) key
        metrics[name] = float(np.mean([np.asarray(h[key]) for h in history]))
    metrics.update(
        {
            "time/logprobs_s": t2 - t1,
            "time/update_s": t3 - t2,
            "update/skipped": float(not history),
            "update/minibatches": float(len(history)),
            "update/minibatches_without_tokens": float(skipped),
            "update/groups": float(real.sum()),
        }
    )
    return state, metrics

"""DAPO's dynamic sampling (Eq. 2's constraint 0 < |{o_i correct}| < G), as host-side bookkeeping.

A group whose G responses are all correct or all wrong has all-equal accuracy, hence zero advantage
and no gradient: DAPO drops it and samples more prompts until the batch holds `batch_groups` groups
with mixed outcomes. Sampling is delegated to a `sample_groups(num_prompts)` callable (rollouts on
the policy in training, a stub in tests), so this module never touches a model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TypeVar

Group = TypeVar("Group")


@dataclasses.dataclass(frozen=True)
class SamplingReport:
    """What one call of `fill_batch` did; `metrics()` flattens it for the per-step log."""

    rounds: int  # sampling rounds run (1 = the batch filled on the first round)
    groups_sampled: int
    groups_filtered: int  # dropped for having 0 or G correct responses
    groups_kept: int  # in the returned batch (== batch_groups when batch_full)
    batch_full: bool

    @property
    def filtered_fraction(self) -> float:
        return self.groups_filtered / self.groups_sampled if self.groups_sampled else 0.0

    def metrics(self) -> dict[str, float]:
        return {
            "dynamic_sampling/rounds": float(self.rounds),
            "dynamic_sampling/groups_sampled": float(self.groups_sampled),
            "dynamic_sampling/groups_kept": float(self.groups_kept),
            "dynamic_sampling/filtered_fraction": self.filtered_fraction,
            "dynamic_sampling/batch_full": float(self.batch_full),
        }


def is_informative(num_correct: int, group_size: int) -> bool:
    """Eq. 2's constraint: at least one correct and at least one wrong response in the group."""
    if not 0 <= num_correct <= group_size:
        raise ValueError(f"num_correct={num_correct} is outside [0, group_size={group_size}]")
    return 0 < num_correct < group_size


def fill_batch(
    sample_groups: Callable[[int], Sequence[Group]],
    num_correct: Callable[[Group], int],
    *,
    batch_groups: int,
    group_size: int,
    max_rounds: int,
    prompts_per_round: int | None = None,
) -> tuple[list[Group], SamplingReport]:
    """Sample rounds of `prompts_per_round` prompts (default `batch_groups`) until `batch_groups`
    informative groups are collected or `max_rounds` rounds have run.

    Every round asks for the same number of prompts so the rollout keeps one compiled shape.
    Informative groups are kept in sampling order and the surplus of the last round is dropped.
    When the rounds run out first, the batch is returned short (`report.batch_full` is False;
    possibly empty) and the caller decides how to train on it.
    """
    if batch_groups < 1 or max_rounds < 1:
        raise ValueError(f"need batch_groups >= 1 and max_rounds >= 1, got {batch_groups}, {max_rounds}")
    per_round = batch_groups if prompts_per_round is None else prompts_per_round
    if per_round < 1:
        raise ValueError(f"prompts_per_round must be >= 1, got {per_round}")
    kept: list[Group] = []
    sampled = filtered = rounds = 0
    while len(kept) < batch_groups and rounds < max_rounds:
        groups = sample_groups(per_round)
        rounds += 1
        sampled += len(groups)
        for group in groups:
            if is_informative(num_correct(group), group_size):
                kept.append(group)
            else:
                filtered += 1
    kept = kept[:batch_groups]
    report = SamplingReport(
        rounds=rounds,
        groups_sampled=sampled,
        groups_filtered=filtered,
        groups_kept=len(kept),
        batch_full=len(kept) == batch_groups,
    )
    return kept, report

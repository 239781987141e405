"""AdamW with linear warmup + cosine decay, global-norm clipping, and parameters frozen by regex.

Parameters are addressed by their dotted path in the model (`model.visual.blocks.attn.qkv.kernel`;
stacked layers have one path for all layers, `model.visual.blocks.0.attn.qkv.kernel` when unrolled).
A parameter whose path matches any `freeze` pattern (`re.search`) gets `optax.set_to_zero()`: no
update, no optimizer state, and (see `step.py`) no gradient computed for it.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import optax

TRAIN, FROZEN = "train", "frozen"


def path_name(path: tuple) -> str:
    """A pytree key path → `a.b.0.kernel`."""
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return ".".join(parts)


def param_labels(params: Any, freeze: Sequence[str]) -> Any:
    """A tree like `params` with `"frozen"` where a path matches a `freeze` regex, else `"train"`.

    A pattern that matches no parameter is an error (a typo would otherwise train everything).
    """
    patterns = [re.compile(p) for p in freeze]
    used = [False] * len(patterns)

    def label(path, _):
        name = path_name(path)
        hit = False
        for i, pattern in enumerate(patterns):
            if pattern.search(name):
                used[i] = hit = True
        return FROZEN if hit else TRAIN

    labels = jax.tree_util.tree_map_with_path(label, params)
    unused = [p.pattern for p, u in zip(patterns, used, strict=True) if not u]
    if unused:
        example = path_name(jax.tree_util.tree_flatten_with_path(params)[0][0][0])
        raise ValueError(f"freeze pattern(s) {unused} match no parameter (paths look like {example!r})")
    return labels


def learning_rate_schedule(optim: Mapping, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr` over `warmup_steps`, then cosine to `lr * min_lr_ratio`."""
    warmup = int(optim["warmup_steps"])
    if total_steps <= warmup:
        raise ValueError(f"optim.warmup_steps={warmup} must be below train.steps={total_steps}")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=float(optim["lr"]),
        warmup_steps=warmup,
        decay_steps=total_steps,
        end_value=float(optim["lr"]) * float(optim["min_lr_ratio"]),
    )


def decay_mask(params: Any) -> Any:
    """Weight decay on matrices only (not on biases and norm scales)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


OPTIM_KEYS = ("lr", "warmup_steps", "min_lr_ratio", "b1", "b2", "eps", "weight_decay", "clip_norm")


def make_optimizer(
    optim: Mapping, total_steps: int, freeze: Sequence[str]
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """`(tx, schedule)`: clip → AdamW(schedule) on trainable parameters, zero on frozen ones.

    Equal settings give the same `tx` object: a step jitted with it static (`train.step.StepSpec`)
    compiles once per process for all the runs of one configuration (a run and its resumption, the
    same stage run twice), not once per run (optax's transforms are closures, equal only to
    themselves)."""
    return _make_optimizer(tuple(float(optim[k]) for k in OPTIM_KEYS), int(total_steps), tuple(freeze))


@functools.cache
def _make_optimizer(
    settings: tuple[float, ...], total_steps: int, freeze: tuple[str, ...]
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    optim = dict(zip(OPTIM_KEYS, settings, strict=True))
    schedule = learning_rate_schedule(optim, total_steps)
    adamw = optax.chain(
        optax.clip_by_global_norm(optim["clip_norm"]),
        optax.adamw(
            schedule,
            b1=optim["b1"],
            b2=optim["b2"],
            eps=optim["eps"],
            weight_decay=optim["weight_decay"],
            mask=decay_mask,
        ),
    )
    tx = optax.multi_transform(
        {TRAIN: adamw, FROZEN: optax.set_to_zero()}, lambda params: param_labels(params, freeze)
    )
    return tx, schedule

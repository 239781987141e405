"""What a training config may hold, in one table: every key's type and range, and the rules that
tie keys together (mutually exclusive options, orderings, RL batch shapes). `validate_config`
checks a whole config at start-up, before any model, data or file is touched, and raises one
`ConfigError` listing every problem with its key.

    validate_config(config)   # every stage calls it first, in `check_start`

The stage and its record kind are the registry's (`pathor1_jax.stages`), checked before this.

A key of `KEYS` that the config does not have is not checked (configs of different stages hold
different blocks); a key the config has and `KEYS` does not know is left alone.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ml_collections

from pathor1_jax.data.prompts import PROMPT_STYLES
from pathor1_jax.errors import ConfigError
from pathor1_jax.kernels.attention import IMPLS as ATTENTION_IMPLS
from pathor1_jax.kernels.policy_loss import AGG_MODES
from pathor1_jax.kernels.policy_loss import IMPLS as POLICY_LOSS_IMPLS
from pathor1_jax.models.scan import REMAT_POLICIES
from pathor1_jax.outputs import check_writable_dir
from pathor1_jax.sharding.rules import PRESETS as SHARDING_PRESETS


@dataclasses.dataclass(frozen=True)
class Key:
    """A value's rule: `ok(value)` and what is expected, for the message."""

    ok: Callable[[Any], bool]
    expected: str


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def Int(lo: int | None = None, hi: int | None = None) -> Key:
    """An integer in `[lo, hi]`."""
    bounds = " ".join(
        filter(None, [f">= {lo}" if lo is not None else "", f"<= {hi}" if hi is not None else ""])
    )
    return Key(
        lambda v: _is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi),
        f"an integer {bounds}".strip(),
    )


def Float(
    lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False
) -> Key:
    """A finite number in the interval (ints accepted)."""
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi}")

    def ok(v: Any) -> bool:
        if not _is_number(v):
            return False
        if lo is not None and (v <= lo if lo_open else v < lo):
            return False
        return hi is None or (v < hi if hi_open else v <= hi)

    return Key(ok, " ".join(["a finite number", *parts]))


def OneOf(*choices: str) -> Key:
    return Key(lambda v: v in choices, f"one of {list(choices)}")


def Str(nonempty: bool = False) -> Key:
    return Key(lambda v: isinstance(v, str) and (bool(v.strip()) or not nonempty),
               "a non-empty string" if nonempty else "a string")  # fmt: skip


def _compiles(v: Any) -> bool:
    try:
        re.compile(v)
    except (re.error, TypeError):
        return False
    return True


BOOL = Key(lambda v: isinstance(v, bool), "true or false")
REGEX = Key(lambda v: isinstance(v, str) and _compiles(v), "a valid regular expression")
REGEXES = Key(lambda v: isinstance(v, (tuple, list)) and all(REGEX.ok(p) for p in v),
              "a list of valid regular expressions")  # fmt: skip
DTYPE = OneOf("float32", "bfloat16", "float16")

# Ranges are what the code can run with; the values a run should use are in the configs.
KEYS: dict[str, Key] = {
    "model.preset": Str(),
    "model.path": Str(),
    "model.init_from": Str(),
    "model.open_clip_file": Str(),
    "model.dtype": DTYPE,
    "model.param_dtype": DTYPE,
    "model.attention_impl": OneOf(*ATTENTION_IMPLS),
    "model.seed": Int(),
    "model.scan_layers": BOOL,
    "model.remat": OneOf(*REMAT_POLICIES),
    "data.source": Str(nonempty=True),
    "data.format": OneOf("jsonl", "array_record"),
    "data.kind": OneOf("", "caption", "chat", "mcq", "vqa"),  # "": the stage's records (the registry)
    "data.split": Str(nonempty=True),
    "data.include": REGEX,
    "data.tokenizer_path": Str(),
    "data.image_processor_path": Str(),
    "data.min_pixels": Int(1),
    "data.max_pixels": Int(1),
    "data.batch_size": Int(1),
    "data.max_len": Int(1),
    "data.packing": BOOL,
    "data.overflow": OneOf("truncate", "drop"),
    "data.on_bad_image": OneOf("error", "skip"),
    "data.max_images": Int(0),
    "data.max_patches": Int(0),
    "data.seed": Int(),
    "data.shuffle": BOOL,
    "data.num_epochs": Int(0),
    "data.worker_count": Int(0),
    "data.prescan": Int(0),
    "data.max_consecutive_drops": Int(1),
    "optim.lr": Float(0),
    "optim.warmup_steps": Int(0),
    "optim.min_lr_ratio": Float(0, 1),
    "optim.b1": Float(0, 1, hi_open=True),
    "optim.b2": Float(0, 1, hi_open=True),
    "optim.eps": Float(0, lo_open=True),
    "optim.weight_decay": Float(0),
    "optim.clip_norm": Float(0, lo_open=True),
    "freeze": REGEXES,
    "train.steps": Int(1),
    "train.grad_accum": Int(1),
    "train.log_every": Int(1),
    "train.ckpt_every": Int(1),
    "train.keep": Int(1),
    "train.seed": Int(),
    "train.out_dir": Str(nonempty=True),
    "train.on_nonfinite": OneOf("stop", "skip"),
    "train.max_nonfinite_skips": Int(0),
    "sharding.preset": Key(
        lambda v: v in ("", None, *SHARDING_PRESETS), f"one of {sorted(SHARDING_PRESETS)}"
    ),
    "rl.algo": OneOf("grpo", "dapo"),
    "rl.group_size": Int(2),  # group-relative advantages need at least two samples
    "rl.batch_groups": Int(1),
    "rl.groups_per_minibatch": Int(1),
    "rl.mu": Int(1),
    "rl.max_new_tokens": Int(1),
    "rl.prompt_len": Int(0),
    "rl.temperature": Float(0, lo_open=True),  # the log-probs divide by it
    "rl.top_p": Float(0, 1, lo_open=True),
    "rl.top_k": Int(0),
    "rl.epsilon": Float(0, lo_open=True),
    "rl.beta": Float(0),
    "rl.eps_low": Float(0, lo_open=True),
    "rl.eps_high": Float(0, lo_open=True),
    "rl.l_max": Int(0),
    "rl.l_cache": Int(0),
    "rl.dapo_reward": OneOf("paper", "soft"),
    "rl.max_rounds": Int(1),
    "rl.loss_impl": OneOf(*POLICY_LOSS_IMPLS),
    "rl.prompt_style": OneOf(*PROMPT_STYLES),
    "rl.short_batch": OneOf("error", "train"),
    "rl.loss_agg": OneOf(*AGG_MODES),
    "rl.dual_clip": Key(lambda v: _is_number(v) and (v == 0 or v > 1), "0 (off) or a finite number > 1"),
    "rl.advantage_std": OneOf("population", "unbiased"),
}


def _get(config: Mapping, key: str) -> tuple[bool, Any]:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, (Mapping, ml_collections.ConfigDict)) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _exclusive(*keys: str) -> Callable[[Mapping], str | None]:
    def rule(config: Mapping) -> str | None:
        set_keys = [k for k in keys if _get(config, k)[1]]
        if len(set_keys) > 1:
            shown = ", ".join(f"{k}={_get(config, k)[1]!r}" for k in set_keys)
            return f"{' and '.join(set_keys)} are mutually exclusive (got {shown}); set one"
        return None

    return rule


def _warmup_below_steps(config: Mapping) -> str | None:
    has, stage = _get(config, "stage")
    if has and stage in ("grpo", "dapo"):  # the RL schedule counts updates, not steps
        return None
    warmup, steps = _get(config, "optim.warmup_steps")[1], _get(config, "train.steps")[1]
    if _is_int(warmup) and _is_int(steps) and warmup >= steps:
        return f"optim.warmup_steps={warmup} must be below train.steps={steps}"
    return None


def _pixels_ordered(config: Mapping) -> str | None:
    lo, hi = _get(config, "data.min_pixels")[1], _get(config, "data.max_pixels")[1]
    if _is_int(lo) and _is_int(hi) and lo > hi:
        return f"data.min_pixels={lo} must not exceed data.max_pixels={hi}"
    return None


def _rl_rules(config: Mapping) -> str | None:
    has, rl = _get(config, "rl")
    if not has:
        return None
    stage = _get(config, "stage")[1]
    if rl.get("algo") != stage:
        return f"rl.algo={rl.get('algo')!r} and stage={stage!r} must agree"
    batch, mini = rl.get("batch_groups"), rl.get("groups_per_minibatch")
    if _is_int(batch) and _is_int(mini) and mini > 0 and batch % mini:
        return f"rl.batch_groups={batch} is not a multiple of rl.groups_per_minibatch={mini}"
    if rl.get("algo") == "dapo":
        l_max = rl.get("l_max") or rl.get("max_new_tokens")
        if _is_int(l_max) and _is_int(rl.get("l_cache")) and not 0 < rl["l_cache"] <= l_max:
            return (
                f"rl.l_cache={rl['l_cache']} must be in (0, L_max], L_max = {l_max} "
                "(rl.l_max, or rl.max_new_tokens when 0)"
            )
    return None


def _clip_no_accumulation(config: Mapping) -> str | None:
    if _get(config, "stage")[1] == "clip" and _get(config, "train.grad_accum")[1] not in (1, None):
        return "train.grad_accum: the contrastive loss of a batch does not split into micro-batches; use 1"
    return None


RULES: tuple[Callable[[Mapping], str | None], ...] = (
    _exclusive("model.path", "model.hf_config"),
    _exclusive("model.init_from", "model.open_clip_file"),
    _warmup_below_steps,
    _pixels_ordered,
    _rl_rules,
    _clip_no_accumulation,
)


def config_problems(config: Mapping) -> list[str]:
    """Every problem of `config` as `key=value: expected ...` (or a rule's message)."""
    problems = []
    for key, rule in KEYS.items():
        has, value = _get(config, key)
        if has and not rule.ok(value):
            problems.append(f"{key}={value!r}: expected {rule.expected}")
    if not problems:  # the rules assume well-typed values
        problems = [message for rule in RULES if (message := rule(config))]
    return problems


def validate_config(config: Mapping) -> None:
    """Raise `ConfigError` listing every problem of `config` (see `KEYS` and `RULES`)."""
    problems = config_problems(config)
    if problems:
        raise ConfigError("config: " + "; ".join(problems))


def check_start(config: ml_collections.ConfigDict, out_dir: str | Path | None = None) -> Path:
    """What every stage does first, before any model, data or file: the whole config validated
    (`schema.validate_config`) and the run directory (`out_dir`, default `config.train.out_dir`)
    write-tested: created, probed, and the folders the probe created removed again, so that a run
    refused later at start-up leaves nothing behind (the run creates it for good when it starts)."""
    validate_config(config)
    return check_writable_dir(out_dir or config.train.out_dir, "run directory", keep=False)

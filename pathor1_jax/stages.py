"""The stages of Patho-R1 (paper §3), one `StageEntry` each: `pathor1 train` runs the entry named by
`config.stage`, `pathor1 demo` walks `STAGES` in order (data curation first: it makes data, not a
checkpoint, so it has a demo but no `run`; `pathor1 curate` runs its steps).

    result = stages.run(config)  # config.stage="sft" → pathor1_jax.train.run:run_lm(config, None)

An entry names its implementation by module path (`"package.module:function"`, imported when used,
like `cli.COMMANDS`), so reading the registry imports no JAX and no stage imports another. Adding a
stage is one entry below: `run(config, out_dir=None) -> StageResult` somewhere under `train/`,
`rl/` or `curation/`, the record kind its data must be, and optionally its part in the demo.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pathor1_jax.errors import ConfigError

if TYPE_CHECKING:
    import ml_collections

    from pathor1_jax.train.result import StageResult

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@dataclasses.dataclass(frozen=True)
class Demo:
    """A stage's part in `pathor1 demo`.

    configs: config files under `configs/` (`file.py[:arg]`) run in order, each from the weights of
        the one before; with several, each runs in `<stage dir>/<arg or file stem>`.
    start_from: the stages whose weights the first config starts from: the last of them that the
        demo has run so far; none run (or none named) → random init.
    evaluate: `"module:function"`, `(config, model_dir | None) -> {name: value}`: held-out numbers of
        the model the stage starts from (None: random init) and of the trained one.
    evaluate_reads: the config keys (dotted) `evaluate` reads, the only ones it is given: a model
        that one walk of the demo has measured with the same values there (GRPO and DAPO both start
        from the SFT run) is not measured again.
    run: `"module:function"`, `(out_dir) -> StageResult`, in place of `configs`: a demo that trains
        nothing (curation: its result reports the pairs found against the demo book's truth).
    """

    configs: tuple[str, ...] = ()
    start_from: tuple[str, ...] = ()
    evaluate: str | None = None
    evaluate_reads: tuple[str, ...] = ()
    run: str | None = None


@dataclasses.dataclass(frozen=True)
class StageEntry:
    """name: the `config.stage` that selects it (and its directory in the demo). section: where the
    paper describes it. records: the record kind (`data.records`) it trains on; a config whose
    `data.kind` differs is refused. run: `"module:function"`, `(config, out_dir | None) ->
    StageResult` (out_dir None: `config.train.out_dir`). records and run None: a stage that
    `pathor1 train` does not run (curation). compile: `"module:function"`, `(config, mesh,
    rules, num_hosts) -> train.aot.AotStep`: the stage's step with abstract state and batch, for
    `pathor1 compile` (ahead-of-time compilation for a TPU slice). batch_key: the config key of its
    batch (per process), which `pathor1 compile --max-batch` searches."""

    name: str
    title: str
    section: str
    records: str | None
    run: str | None
    demo: Demo | None = None
    compile: str | None = None
    batch_key: str = "data.batch_size"


STAGES: dict[str, StageEntry] = {
    entry.name: entry
    for entry in (
        StageEntry(
            "curation", "data curation", "§3.2–3.4",
            None, None, Demo(run="pathor1_jax.curation.demo:demo_stage"),
        ),
        StageEntry(
            "cpt", "continued pretraining", "§3.2", "caption", "pathor1_jax.train.run:run_lm",
            Demo(("demo_cpt.py",)), compile="pathor1_jax.train.run:lm_aot_step",
        ),
        StageEntry(
            "sft", "chain-of-thought SFT", "§3.3", "chat", "pathor1_jax.train.run:run_lm",
            Demo(("demo_sft.py",), start_from=("cpt",)), compile="pathor1_jax.train.run:lm_aot_step",
        ),
        StageEntry(
            "grpo", "GRPO (Eqs. 1, 3)", "§3.4", "mcq", "pathor1_jax.rl.train:run_rl",
            Demo(("grpo_tiny.py",), start_from=("cpt", "sft"), evaluate="pathor1_jax.eval.demo:held_out_mcq",
                 evaluate_reads=("rl.prompt_style", "rl.max_new_tokens")),
            compile="pathor1_jax.rl.train:rl_aot_step", batch_key="rl.groups_per_minibatch",
        ),
        StageEntry(
            "dapo", "DAPO (Eqs. 2, 4)", "§3.4", "mcq", "pathor1_jax.rl.train:run_rl",
            Demo(("dapo_tiny.py",), start_from=("cpt", "sft"), evaluate="pathor1_jax.eval.demo:held_out_mcq",
                 evaluate_reads=("rl.prompt_style", "rl.max_new_tokens")),
            compile="pathor1_jax.rl.train:rl_aot_step", batch_key="rl.groups_per_minibatch",
        ),
        StageEntry(
            "clip", "PathoCLIP, two-stage contrastive", "§3.2, App. B.1", "caption",
            "pathor1_jax.train.clip_stage:run_clip",
            Demo(
                ("pathoclip_tiny.py:stage1", "pathoclip_tiny.py:stage2"),
                evaluate="pathor1_jax.eval.demo:held_out_zero_shot",
                evaluate_reads=("model",),
            ),
            compile="pathor1_jax.train.clip_stage:clip_aot_step",
        ),
    )
}  # fmt: skip


def resolve(ref: str) -> Callable:
    """`"package.module:function"` → the function (importing its module)."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def get(name: str) -> StageEntry:
    """The entry `pathor1 train` runs for `config.stage=name`."""
    trained = [stage for stage, entry in STAGES.items() if entry.run is not None]
    if name not in trained:
        what = f"{STAGES[name].title} is not a training stage; " if name in STAGES else ""
        raise ConfigError(f"config.stage={name!r}: {what}expected one of {trained}")
    return STAGES[name]


def run(config: ml_collections.ConfigDict, out_dir: str | Path | None = None) -> StageResult:
    """Train the stage `config.stage` on its config, writing to `out_dir` (default
    `config.train.out_dir`). An empty `config.data.kind` (`base_config`'s) becomes the entry's records."""
    entry = get(config.stage)
    kind = config.data.get("kind") if "data" in config else None
    if kind == "":
        config.data.kind = entry.records
    elif kind is not None and kind != entry.records:
        raise ConfigError(
            f"config.data.kind={kind!r} but stage {entry.name!r} trains on {entry.records!r} records"
        )
    return resolve(entry.run)(config, out_dir)


def set_steps(config: ml_collections.ConfigDict, steps: int) -> str:
    """`config` set to train `steps` steps (>= 1), its warmup cut to at most `steps // 8` (none below
    8 steps); the change in words."""
    warmup = min(config.optim.warmup_steps, steps // 8)
    said = f"train.steps={config.train.steps} -> {steps}"
    if warmup != config.optim.warmup_steps:
        said += f", optim.warmup_steps={config.optim.warmup_steps} -> {warmup}"
    with config.unlocked():
        config.train.steps, config.optim.warmup_steps = steps, warmup
    return said


def run_demo(
    entry: StageEntry,
    out_dir: Path,
    ran: dict[str, Path],
    steps: int | None = None,
    measured: dict[tuple, dict[str, float]] | None = None,
) -> StageResult:
    """`entry`'s demo stage under `out_dir`, starting from the runs of the stages `ran` so far (name →
    run directory, in order); `steps` shortens (or lengthens) each run (see `set_steps`; printed).
    `measured`: the held-out numbers of this walk so far, added to here (see `evaluate_reads`)."""
    from pathor1_jax.train.config import load_config

    demo = entry.demo
    if demo.run is not None:
        return resolve(demo.run)(out_dir)
    start = next((path for name, path in reversed(ran.items()) if name in demo.start_from), None)
    measured = {} if measured is None else measured
    results, init, before = [], start, {}
    for i, spec in enumerate(demo.configs):
        file, _, arg = spec.partition(":")
        run_dir = out_dir / (arg or Path(file).stem) if len(demo.configs) > 1 else out_dir
        overrides = [f"--config.train.out_dir={run_dir}", f"--config.model.init_from={init or ''}"]
        config = load_config(str(CONFIGS / spec), overrides)
        if steps is not None:
            print(f"{entry.name} ({spec}): --steps {steps}: {set_steps(config, steps)}")
        if demo.evaluate and i == 0:
            before = _held_out(demo, config, start, measured)
        results.append(run(config))
        init = run_dir
        if results[-1].preempted:  # SIGTERM: the run saved a checkpoint; the walk stops here
            break
    after = _held_out(demo, config, init, measured) if demo.evaluate and not results[-1].preempted else {}
    first, last = results[0], results[-1]
    return dataclasses.replace(
        last,
        out_dir=out_dir,
        start_step=first.start_step,
        end_step=sum(r.end_step for r in results),
        first=first.first,
        evals={name: (before.get(name), value) for name, value in after.items()},
        metrics_paths=tuple(r.metrics_path for r in results) if len(results) > 1 else (),
    )


def _held_out(
    demo: Demo, config: ml_collections.ConfigDict, model_dir: Path | None, measured: dict
) -> dict[str, float]:
    """`demo.evaluate` of `model_dir`, given the keys of `config` that `demo.evaluate_reads` names;
    numbers in `measured` for the same evaluator, model and values are used instead, new ones kept."""
    import ml_collections

    reads: dict = {}
    for key in demo.evaluate_reads:
        *parents, leaf = key.split(".")
        value, node = config, reads
        for part in parents:
            value, node = value[part], node.setdefault(part, {})
        node[leaf] = value[leaf]
    reads = ml_collections.ConfigDict(reads)
    model = None if model_dir is None else str(Path(model_dir).resolve())
    key = (demo.evaluate, model, reads.to_json_best_effort(sort_keys=True))
    if key not in measured:
        measured[key] = resolve(demo.evaluate)(reads, model_dir)
    return measured[key]

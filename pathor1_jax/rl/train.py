"""GRPO / DAPO training runs on the trainer's machinery (mesh, sharded model, optimizer, resume,
checkpoints, metrics): `run_rl(config)` for `config.stage` in ("grpo", "dapo").

Config blocks beyond the trainer's (see `pathor1_jax.train.defaults`): `rl` (see `rl_defaults`) and
`data` with `kind="mcq"`. `train.steps` counts RL steps (one rollout batch each); the optimizer's
schedule counts updates, `μ · batch_groups / groups_per_minibatch` per RL step. A checkpoint holds
the train state and the prompt stream's position and sampling round, so a resumed run continues
with the prompts and seeds it would have used.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pathor1_jax.data.pipeline import get_processor, load_source, processor_spec_from_config
from pathor1_jax.data.prompts import DEFAULT_PROMPT_STYLE
from pathor1_jax.errors import ConfigError
from pathor1_jax.logical import Rules, batch_parts
from pathor1_jax.models import qwen2_5_vl
from pathor1_jax.rl import rewards
from pathor1_jax.rl.prompts import PromptStream, decode_response
from pathor1_jax.rl.rollout import rollout
from pathor1_jax.rl.step import (
    PAPER_AGG,
    LossConfig,
    RolloutSampler,
    ShortBatchError,
    jit_update,
    rl_step,
)
from pathor1_jax.sharding.multihost import any_process, batch_spec
from pathor1_jax.sharding.params import abstract_params
from pathor1_jax.train.aot import AotStep, qwen_flops, sds
from pathor1_jax.train.defaults import base_config
from pathor1_jax.train.optim import make_optimizer
from pathor1_jax.train.result import StageResult
from pathor1_jax.train.run import image_patch_budget, initial_params, model_config, model_factory
from pathor1_jax.train.schema import check_start
from pathor1_jax.train.step import StepSpec, abstract_state
from pathor1_jax.train.trainer import (
    Stage,
    Trainer,
    on_mesh,
)

ALGOS = ("grpo", "dapo")


def rl_defaults(algo: str) -> ml_collections.ConfigDict:
    """The `config.rl` block. Each value says where it comes from: "paper" (Patho-R1 §3.4, Eqs. 1–4),
    "DAPO paper" (Yu et al. 2025, which Patho-R1 cites for DAPO but whose numbers it does not
    restate) or "ours" (Patho-R1 publishes no RL hyper-parameters; README, "Our choices")."""
    return ml_collections.ConfigDict(
        dict(
            algo=algo,
            prompt_style=DEFAULT_PROMPT_STYLE,  # paper: the authors' released inference prompt
            group_size=8,  # G: the paper samples G outputs per prompt; 8 is ours
            batch_groups=8,  # ours: prompts per rollout batch (after DAPO's filtering)
            groups_per_minibatch=4,  # ours: prompts per policy update
            mu=1,  # ours: passes over the rollout batch (1 = on-policy, π_old = π_θ at the update)
            max_new_tokens=256,  # ours: response budget; also DAPO's L_max unless l_max is set
            prompt_len=0,  # prompts left-padded to this many tokens (one compiled shape); 0 = next 64
            temperature=1.0,  # ours: sampling temperature; the log-probs use the same T
            top_p=1.0,  # ours: no nucleus truncation
            top_k=0,  # ours: no top-k truncation
            epsilon=0.2,  # GRPO clip: ours (the paper writes ε without a value; 0.2 as PPO/GRPO)
            beta=0.04,  # ours: GRPO KL coefficient (k3 against the frozen initial model, as Eq. 1)
            eps_low=0.2,  # DAPO paper: clip-higher ε_low (Patho-R1 gives no value)
            eps_high=0.28,  # DAPO paper: clip-higher ε_high (Patho-R1 gives no value)
            l_max=0,  # ours: DAPO length penalty L_max; 0 = max_new_tokens
            l_cache=64,  # ours: DAPO soft-punishment cache zone L_cache
            dapo_reward="paper",  # Eq. 4 read literally ("paper", binary) | "soft" (ours)
            stratify=False,  # ours: True = each step's prompts in the set's mix of (question, answer)
            max_rounds=4,  # ours: DAPO dynamic sampling: rollout rounds per step at most
            short_batch="error",  # ours, as verl/EasyR1: rounds ran out before a full batch: error | train
            loss_agg=PAPER_AGG[algo],  # paper (Eq. 1 / Eq. 2 as written) | token-mean (verl)
            dual_clip=0.0,  # paper: off (0); verl/EasyR1 use 3.0 (c·A floor for negative advantages)
            advantage_std="population",  # paper's σ read literally | "unbiased" (verl, EasyR1)
            loss_impl="auto",  # policy-loss kernel: auto | pallas | chunked | xla (jnp reference)
        )
    )


def rl_config(algo: str) -> ml_collections.ConfigDict:
    """A complete RL config: the trainer's defaults with `stage`, MCQ data and the `rl` block."""
    if algo not in ALGOS:
        raise ValueError(f"RL algo must be one of {ALGOS}, got {algo!r}")
    config = base_config("sft")
    config.stage = algo
    config.data.kind = "mcq"
    config.rl = rl_defaults(algo)
    config.optim.warmup_steps = 0
    config.optim.min_lr_ratio = 1.0  # constant learning rate
    config.train.out_dir = f"runs/{algo}"
    return config


def reward_function(rl: ml_collections.ConfigDict):
    """`(text, answer, num_tokens) → reward` of the configured algorithm."""
    if rl.algo == "grpo":
        return lambda text, answer, num_tokens: rewards.grpo_reward(text, answer)
    l_max = int(rl.l_max or rl.max_new_tokens)
    return partial(_dapo, l_max=l_max, l_cache=int(rl.l_cache), variant=rl.dapo_reward)


def _dapo(text: str, answer: str, num_tokens: int, *, l_max: int, l_cache: int, variant: str) -> float:
    return rewards.dapo_reward(text, answer, num_tokens, l_max, l_cache, variant)


def loss_config(rl: ml_collections.ConfigDict) -> LossConfig:
    return LossConfig(
        algo=rl.algo,
        group_size=int(rl.group_size),
        epsilon=float(rl.epsilon),
        beta=float(rl.beta),
        eps_low=float(rl.eps_low),
        eps_high=float(rl.eps_high),
        agg=rl.loss_agg,
        dual_clip=float(rl.dual_clip) or None,
        advantage_std=rl.advantage_std,
        temperature=float(rl.temperature),
        impl=rl.loss_impl,
    )


class RLData:
    """The resumable part of RL data: the prompt stream's position and the sampler's round counter."""

    def __init__(self, prompts: PromptStream, sampler: RolloutSampler):
        self.prompts, self.sampler = prompts, sampler

    def get_state(self) -> dict:
        return {**self.prompts.get_state(), "sampling_round": self.sampler.seed}

    def set_state(self, state: dict) -> None:
        self.prompts.set_state(state)
        self.sampler.seed = int(state["sampling_round"])


class RLTrainer(Trainer):
    def __init__(self, config: ml_collections.ConfigDict, out_dir: str | Path):
        out_dir = check_start(config, out_dir)
        rl = config.rl
        self.rl_steps = int(config.train.steps)
        self.loss_cfg = loss_config(rl)
        cfg = model_config(config.model)
        self.processor = get_processor(processor_spec_from_config(config.data, cfg))
        self.prompts = PromptStream(
            load_source(config.data),
            self.processor,
            seed=int(config.data.seed),
            shuffle=bool(config.data.shuffle),
            stratify=bool(rl.stratify),
            style=rl.prompt_style,
            on_bad_image=config.data.on_bad_image,
        )
        self.sampler = RolloutSampler(self.prompts, self._rollout)
        updates_per_step = int(rl.mu) * int(rl.batch_groups) // int(rl.groups_per_minibatch)
        optimizer_config = ml_collections.ConfigDict(config.to_dict())
        optimizer_config.train.steps = self.rl_steps * updates_per_step
        make_model = model_factory(config.model, cfg)
        init = initial_params(config.model)
        super().__init__(
            optimizer_config,
            Stage(name=rl.algo, step=None, prepare=None),  # RL drives its own steps (`rl_step`)
            make_model,
            RLData(self.prompts, self.sampler),
            out_dir,
            init,
        )
        self.config = config
        self.reference = None
        if rl.algo == "grpo" and float(rl.beta) != 0.0:
            self.reference = self._reference_model(make_model, init)

    def _reference_model(self, make_model, init) -> nnx.Module:
        """GRPO's frozen π_ref: the run's starting weights (the SFT checkpoint), on the same mesh —
        rebuilt from `init_from` (not copied from the state, which may be a resumed one); the random
        init only when the run starts from one."""
        like = abstract_params(nnx.state(nnx.eval_shape(make_model)), self.mesh, self.rules)
        return nnx.merge(self.spec.graphdef, on_mesh(self._start_params(make_model, like, init), self.mesh))

    def _rollout(self, model, prompts, seed: int):
        rl = self.config.rl
        return rollout(
            model,
            prompts,
            group_size=int(rl.group_size),
            max_new_tokens=int(rl.max_new_tokens),
            decode=partial(decode_response, self.processor),
            reward_fn=reward_function(rl),
            temperature=float(rl.temperature),
            top_p=float(rl.top_p),
            top_k=int(rl.top_k),
            seed=int(self.config.train.seed) * 1_000_003 + seed,
            pad_token_id=self.processor.pad_token_id,
            prompt_len=int(rl.prompt_len),
        )

    def _step(self) -> tuple[dict, dict[str, float]]:
        rl = self.config.rl
        return rl_step(
            self.spec,
            self.state,
            self.sampler,
            self.loss_cfg,
            batch_groups=int(rl.batch_groups),
            groups_per_minibatch=int(rl.groups_per_minibatch),
            mu=int(rl.mu),
            max_rounds=int(rl.max_rounds),
            max_new_tokens=int(rl.max_new_tokens),
            pad_token_id=self.processor.pad_token_id,
            reference=self.reference,
            short_batch=rl.short_batch,
        )

    def fit(self) -> StageResult:
        with self.fit_loop(self.rl_steps, self.config.rl.algo) as loop:
            while loop.step < self.rl_steps:
                # every process stops at the same step on a SIGTERM to any of them (preemption)
                (loop.preempted,) = any_process(loop.preemption.requested)
                if loop.preempted:
                    self.save(loop.step, self.data.get_state())
                    break
                t0 = time.perf_counter()
                try:
                    self.state, metrics = self._step()
                except ShortBatchError as e:  # the step's counts go to the log, then the error
                    loop.writer.write(loop.step + 1, e.metrics)
                    raise
                loop.step += 1
                metrics.update(
                    lr=float(self.schedule(max(int(self.state["step"]) - 1, 0))),
                    step_time_s=time.perf_counter() - t0,
                )
                metrics["data/skipped"] = float(self.prompts.skipped)
                loop.check(loop.step, metrics, self.checkpointer.latest_step())  # logs a skip, or stops
                loop.first = metrics["reward/mean"] if loop.first is None else loop.first
                loop.last = metrics["reward/mean"]
                loop.writer.write(loop.step, metrics)
                loop.bar.set_postfix(reward=f"{loop.last:.3f}", acc=f"{metrics['reward/accuracy']:.2f}")
                loop.bar.update(1)
                if loop.step % int(self.config.train.ckpt_every) == 0 or loop.step == self.rl_steps:
                    self.save(loop.step, self.data.get_state())
        return self.result(loop, metric="reward/mean", plot="reward.png")


def run_rl(config: ml_collections.ConfigDict, out_dir: str | Path | None = None) -> StageResult:
    """Train GRPO or DAPO (`config.stage`) on the MCQs of `config.data`, writing to `out_dir`."""
    return RLTrainer(config, out_dir or config.train.out_dir).fit()


def rl_aot_step(config: ml_collections.ConfigDict, mesh: Mesh, rules: Rules, num_hosts: int) -> AotStep:
    """One GRPO / DAPO policy update (`rl.step.jit_update`) at the config's largest mini-batch:
    `rl.groups_per_minibatch × rl.group_size` rows (global: the rollout batch is the run's, not a
    process's) of `rl.prompt_len + rl.max_new_tokens` tokens, each row with its prompt's image at
    `data.max_pixels` (every row carries its own copy of the group's image, as `sequence_inputs`
    feeds them), π_old and (GRPO with β ≠ 0) π_ref log-probs. Rows and image patches are split over
    the mesh's batch axes, as `rollout.sequence_inputs` lays them out (each process's block)."""
    rl = config.rl
    cfg = model_config(config.model)
    freeze = tuple(config.get("freeze") or ())
    tx, _ = make_optimizer(config.optim, max(int(config.train.steps), 1), freeze)
    graphdef, state = abstract_state(model_factory(config.model, cfg), tx, mesh, rules)
    spec, loss_cfg = StepSpec(graphdef=graphdef, tx=tx, freeze=freeze), loss_config(rl)
    rows = int(rl.groups_per_minibatch) * int(rl.group_size)
    response = int(rl.max_new_tokens)
    length = int(rl.prompt_len) + response
    parts = batch_parts(mesh, rules)
    if rows % parts:
        raise ConfigError(
            f"config.rl.groups_per_minibatch x group_size = {rows} rows do not split over the {parts} "
            "devices the rules give the batch"
        )
    image = image_patch_budget(config.data, cfg) if config.data.get("max_pixels") else 0
    patches = rows * image
    split = batch_spec(rules)[0]

    def field(shape, dtype=np.int32, axis=0):
        return sds(shape, dtype, NamedSharding(mesh, PartitionSpec(*([None] * axis), split)))

    unit = cfg.vision.spatial_merge_size**2
    inputs = {
        "input_ids": field((rows, length)),
        "segment_ids": field((rows, length)),
        "pixel_values": field((patches, cfg.vision.patch_dim), np.float32) if patches else None,
        "position_ids": field((3, rows, length), axis=1),
        "vision_index": qwen2_5_vl.VisionIndex(
            window_index=field((patches // unit,)),
            window_segment_ids=field((patches,)),
            frame_segment_ids=field((patches,)),
            rotary_pos_ids=field((patches, 2)),
        )
        if patches
        else None,
        "image_feature_index": field((rows, length)) if patches else None,
        "targets": field((rows, response)),
        "response_mask": field((rows, response)),
    }
    with_ref = loss_cfg.algo == "grpo" and loss_cfg.beta != 0.0
    args = (
        spec,
        loss_cfg,
        state,
        inputs,
        field((rows, response), np.float32),
        field((rows,), np.float32),
        field((rows, response), np.float32) if with_ref else None,
    )
    flops = qwen_flops(
        cfg,
        state["params"],
        freeze,
        rows=rows,
        length=length,
        patches=patches,
        image_patches=image,
        head_positions=rows * response,
        remat=str(config.model.get("remat", "none")),
    )
    shapes = {"rows": rows, "tokens": rows * length, "response tokens": rows * response, "patches": patches}
    return AotStep(jit_update, args, flops, shapes)

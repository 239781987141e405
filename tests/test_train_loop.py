"""The generic trainer on a toy NNX language model fed by the real grain pipeline (demo captions):
exact resume including the data order, frozen parameters, SIGTERM, a crash in the middle of a save."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from pathor1_jax.data.pipeline import batch_iterator_from_config, default_data_config
from pathor1_jax.models.layers import Embed, Linear
from pathor1_jax.train import trainer as trainer_module
from pathor1_jax.train.checkpoint import Checkpointer
from pathor1_jax.train.losses import per_token_nll, shifted_targets
from pathor1_jax.train.metrics import read_metrics
from pathor1_jax.train.optim import learning_rate_schedule, make_optimizer, param_labels
from pathor1_jax.train.step import StepSpec, init_state, jit_step
from pathor1_jax.train.trainer import Stage, Trainer

VOCAB, DIM = 151936, 8


class ToyLM(nnx.Module):
    """Tied embedding → `encoder` (tanh Linear) → logits: small enough to compile in seconds."""

    def __init__(self, rngs: nnx.Rngs, dtype=jnp.float32):
        self.embed = Embed(VOCAB, DIM, rngs=rngs, dtype=dtype)
        self.encoder = Linear(DIM, DIM, use_bias=True, axes=("embed", "mlp"), rngs=rngs, dtype=dtype)

    def hidden(self, ids: jax.Array) -> jax.Array:
        return jnp.tanh(self.encoder(self.embed(ids)))


def toy_nll(model: ToyLM, micro: dict) -> tuple[jax.Array, jax.Array]:
    targets, valid = shifted_targets(micro["labels"], micro["segment_ids"])
    head = model.embed.embedding[...].astype(model.embed.dtype).T  # tied: [D, V]
    return per_token_nll(model.hidden(micro["input_ids"]), head, targets, chunk=32), valid


TOY_STEP = jit_step(toy_nll)


def toy_stage(seen: list[str]) -> Stage:
    """A stage whose host-side preparation records a digest of every batch it is given."""

    def prepare(batch: dict) -> dict:
        seen.append(hashlib.sha1(np.ascontiguousarray(batch["input_ids"]).tobytes()).hexdigest()[:12])
        return {k: batch[k] for k in ("input_ids", "labels", "segment_ids")}

    return Stage(name="toy", step=TOY_STEP, prepare=prepare)


def toy_config(steps: int = 6, freeze: tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.train = dict(steps=steps, grad_accum=2, log_every=1, ckpt_every=3, keep=2, seed=0)
    config.optim = dict(
        lr=1e-2, warmup_steps=1, min_lr_ratio=0.1, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.01, clip_norm=1.0
    )
    config.freeze = freeze
    config.mesh = dict(data=1, fsdp=-1, tensor=1)
    config.sharding = dict(preset="fsdp")
    config.data = dict(shards=0)
    return config


def data_shard(index: int, count: int):
    cfg = default_data_config()
    cfg.kind, cfg.batch_size, cfg.max_len, cfg.max_patches, cfg.max_images = "caption", 2, 64, 64, 4
    return batch_iterator_from_config(cfg, shard=(index, count))


def make_trainer(tmp_path, name: str, seen: list[str], **config_kw) -> Trainer:
    return Trainer(
        toy_config(**config_kw), toy_stage(seen), lambda: ToyLM(nnx.Rngs(0)), data_shard, tmp_path / name
    )


def tree_equal(a, b) -> bool:
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b)))


def test_resume_is_bitwise_exact_including_data_order(tmp_path, monkeypatch):
    random_inits = []  # a resumed run restores its state into the layout, without a random init first
    create_sharded = trainer_module.create_sharded
    monkeypatch.setattr(
        trainer_module, "create_sharded", lambda *a: random_inits.append(1) or create_sharded(*a)
    )
    straight_seen: list[str] = []
    straight = make_trainer(tmp_path, "straight", straight_seen)
    result = straight.fit()
    assert (result.start_step, result.end_step) == (0, 6)

    first_seen: list[str] = []
    first = make_trainer(tmp_path, "split", first_seen)
    first.total_steps = 3  # stop after 3 of the 6 steps (the schedule still spans 6)
    assert first.fit().end_step == 3
    resumed_seen: list[str] = []
    assert len(random_inits) == 2
    resumed = make_trainer(tmp_path, "split", resumed_seen)
    assert resumed.start_step == 3 and len(random_inits) == 2
    assert resumed.fit().end_step == 6

    assert first_seen + resumed_seen == straight_seen  # 2 micro-batches per step, same order
    assert len(straight_seen) == 12 and len(set(straight_seen)) > 6  # the data does move on
    assert int(resumed.state["step"]) == 6
    assert tree_equal(resumed.state, straight.state)  # params, optimizer state, step, RNG
    losses = [r["loss"] for r in read_metrics(tmp_path / "split" / "metrics.jsonl")]
    assert len(losses) == 6 and losses[-1] < losses[0]


def test_frozen_params_do_not_move_and_get_no_optimizer_state(tmp_path):
    trainer = make_trainer(tmp_path, "frozen", [], steps=2, freeze=(r"^encoder\.",))
    before = jax.tree.map(np.asarray, trainer.state["params"])
    trainer.fit()
    after = trainer.state["params"]
    assert tree_equal(after["encoder"], before["encoder"])
    assert not np.array_equal(np.asarray(after["embed"]["embedding"]), before["embed"]["embedding"])
    mu = trainer.state["opt_state"].inner_states["train"].inner_state[1][0].mu
    assert jax.tree.leaves(mu["encoder"]) == []  # masked out: no Adam moments for frozen params
    assert trainer.num_params() == (VOCAB * DIM + DIM * DIM + DIM, VOCAB * DIM)


def test_freeze_pattern_matching_nothing_is_an_error():
    params = {"encoder": {"kernel": np.zeros((2, 2))}, "embed": {"embedding": np.zeros((3, 2))}}
    labels = param_labels(params, [r"^encoder\."])
    assert labels == {"encoder": {"kernel": "frozen"}, "embed": {"embedding": "train"}}
    with pytest.raises(ValueError, match=r"\['\^visual\\\\.'\] match no parameter"):
        param_labels(params, [r"^visual\."])


class Interrupting:
    """A data shard's iterator, with `action()` run instead of (or before) its `at`-th micro-batch."""

    def __init__(self, data, at: int, action):
        self.data, self.at, self.action, self.calls = data, at, action, 0

    def __next__(self):
        self.calls += 1
        if self.calls == self.at:
            self.action()
        return next(self.data)

    def get_state(self):
        return self.data.get_state()

    def set_state(self, state):
        self.data.set_state(state)


def test_sigterm_saves_a_checkpoint_then_stops(tmp_path):
    seen: list[str] = []
    trainer = make_trainer(tmp_path, "preempt", seen, steps=6)
    # grad_accum=2: SIGTERM while step 2's micro-batches are read; the processes agree to stop before
    # step 2, and the checkpoint of step 1 holds the data position before them
    shard = trainer.data.iterators
    shard[0] = Interrupting(shard[0], 3, lambda: os.kill(os.getpid(), signal.SIGTERM))
    result = trainer.fit()
    assert result.preempted and result.end_step == 1
    assert Checkpointer(tmp_path / "preempt" / "checkpoints").latest_step() == 1
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored
    resumed_seen: list[str] = []
    resumed = make_trainer(tmp_path, "preempt", resumed_seen, steps=2)
    assert resumed.fit().end_step == 2
    assert resumed_seen == seen[2:4]  # step 2 trains on the micro-batches read when SIGTERM came


def test_exhausted_data_ends_the_run_with_a_checkpoint(tmp_path, capsys):
    trainer = make_trainer(tmp_path, "finite", [], steps=6)

    def stop():
        raise StopIteration

    shard = trainer.data.iterators
    shard[0] = Interrupting(shard[0], 4, stop)  # step 2 cannot be completed
    result = trainer.fit()
    assert (result.end_step, result.preempted) == (1, False)
    assert Checkpointer(tmp_path / "finite" / "checkpoints").latest_step() == 1
    err = capsys.readouterr().err
    assert "toy: data exhausted after step 1" in err
    # where the steps ran; the toy model has no attention or policy loss, so no kernel traced
    assert f"toy: ran on {jax.device_count()} × cpu (cpu); kernels traced: none" in err


def test_crash_in_the_middle_of_a_save_leaves_the_previous_checkpoint(tmp_path):
    code = f"""
        import os
        import jax.numpy as jnp
        import orbax.checkpoint as ocp
        from pathor1_jax.train.checkpoint import Checkpointer

        ckpt = Checkpointer({str(tmp_path / "ckpt")!r}, keep=3)
        state = {{"params": {{"w": jnp.arange(6.0).reshape(2, 3)}}, "step": jnp.asarray(1)}}
        ckpt.save(1, state, {{"position": 4}})
        ckpt.wait()

        write_json = ocp.JsonCheckpointHandler._save_fn

        async def write_then_crash(self, *args, **kwargs):
            await write_json(self, *args, **kwargs)
            os._exit(17)  # step 2's files are (partly) written, not yet committed

        ocp.JsonCheckpointHandler._save_fn = write_then_crash
        state2 = {{"params": {{"w": state["params"]["w"] + 1}}, "step": jnp.asarray(2)}}
        ckpt.save(2, state2, {{"position": 8}})
        ckpt.wait()
        """
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 17, proc.stderr
    leftovers = sorted(os.listdir(tmp_path / "ckpt"))
    assert "1" in leftovers and "2" not in leftovers and len(leftovers) == 2, leftovers  # + step 2's tmp dir
    ckpt = Checkpointer(tmp_path / "ckpt")
    assert ckpt.latest_step() == 1
    like = {"params": {"w": jnp.zeros((2, 3))}, "step": jnp.asarray(0)}
    state, data_state = ckpt.restore(1, like)
    np.testing.assert_array_equal(state["params"]["w"], np.arange(6.0).reshape(2, 3))
    assert data_state == {"position": 4}
    ckpt.close()


def test_gradient_accumulation_gives_the_token_mean_of_the_whole_batch():
    """2 micro-batches of 2 rows = 1 batch of 4 rows, though the micro-batches hold different numbers
    of loss tokens (a mean of micro-batch means would differ)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 1000, size=(4, 16)).astype(np.int32)
    labels = ids.copy()
    labels[:2, :12] = -100  # targets: micro-batch 1 has 2 × 4, micro-batch 2 has 2 × 15
    micro = {"input_ids": ids, "labels": labels, "segment_ids": np.ones_like(ids)}
    config = toy_config()
    tx, _ = make_optimizer(config.optim, 6, ())
    graphdef, state = init_state(ToyLM(nnx.Rngs(0)), tx, seed=0)
    spec = StepSpec(graphdef=graphdef, tx=tx)
    whole = {k: v[None] for k, v in micro.items()}  # [1, 4, T]
    split = {k: v.reshape(2, 2, -1) for k, v in micro.items()}  # [2, 2, T]
    copy = lambda: jax.tree.map(jnp.array, state)  # noqa: E731  (the step donates its state)
    s1, m1 = TOY_STEP(spec, copy(), whole)
    s2, m2 = TOY_STEP(spec, copy(), split)
    assert int(m1["loss_tokens"]) == int(m2["loss_tokens"]) == 8 + 30
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
    np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), s1["params"], s2["params"]
    )


def test_learning_rate_warms_up_linearly_then_decays_by_cosine():
    schedule = learning_rate_schedule({"lr": 1e-3, "warmup_steps": 4, "min_lr_ratio": 0.1}, 14)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(2)), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(4)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(9)), 1e-4 + 0.5 * 9e-4, rtol=1e-5)  # halfway down the cosine
    np.testing.assert_allclose(float(schedule(14)), 1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="warmup_steps=14 must be below train.steps=14"):
        learning_rate_schedule({"lr": 1e-3, "warmup_steps": 14, "min_lr_ratio": 0.1}, 14)


def test_bf16_compute_keeps_float32_master_weights():
    ids = np.random.default_rng(1).integers(0, 1000, size=(1, 2, 16)).astype(np.int32)
    batch = {"input_ids": ids, "labels": ids, "segment_ids": np.ones_like(ids)}
    config = toy_config()
    results = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        tx, _ = make_optimizer(config.optim, 6, ())
        graphdef, state = init_state(ToyLM(nnx.Rngs(0), dtype=dtype), tx, seed=0)
        results[dtype] = TOY_STEP(StepSpec(graphdef=graphdef, tx=tx), state, batch)
    (_, m32), (s16, m16) = results[jnp.float32], results[jnp.bfloat16]
    assert {x.dtype for x in jax.tree.leaves(s16["params"])} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(s16["opt_state"]) if x.ndim} == {jnp.dtype(jnp.float32)}
    np.testing.assert_allclose(m16["loss"], m32["loss"], rtol=1e-3)
    np.testing.assert_allclose(m16["grad_norm"], m32["grad_norm"], rtol=5e-2)  # bf16 matmuls: close,
    assert float(m16["grad_norm"]) != float(m32["grad_norm"])  # but not the float32 computation

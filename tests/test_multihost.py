"""Real multi-process runs on this machine (`launch/local.sh`: N processes × D fake CPU devices,
jax.distributed + gloo): the same losses and parameters on 1 process × 4 devices and 2 processes × 2
devices, checkpoints resumed across process layouts and mesh shapes, and faults (SIGTERM to one
process, SIGKILL of one process, a kill in the middle of a save, an unwritable run directory).

Runs are few and shared: each test makes several assertions on one chain of runs. Every job is
bounded (see `tests/multihost.py`)."""

from __future__ import annotations

import json
import shutil
import signal
import sys
import time

import pytest
from multihost import (
    CLIP,
    REPO,
    Job,
    assert_close_trees,
    checkpoint_state,
    complete_steps,
    losses,
    metrics,
    run_all_ok,
    run_ok,
    train,
    wait_for,
)

pytestmark = pytest.mark.multiprocess


def assert_same_losses(a: dict[int, float], b: dict[int, float], steps) -> None:
    for step in steps:
        assert a[step] == pytest.approx(b[step], rel=1e-5), f"step {step}: {a[step]} vs {b[step]}"


def test_launcher_streams_prefixed_output_stops_the_others_waits_on_preemption_and_times_out(tmp_path):
    # p1 fails once the others have spoken and wait for SIGTERM (files in $READY say so)
    script = (
        'trap "echo stopped; exit 143" TERM; '
        'echo "p$JAX_PROCESS_ID of $JAX_NUM_PROCESSES at $JAX_COORDINATOR_ADDRESS: $XLA_FLAGS"; '
        'if [ "$JAX_PROCESS_ID" = 1 ]; then until [ -e "$READY/0" ] && [ -e "$READY/2" ]; do sleep 0.1; '
        'done; exit 3; fi; touch "$READY/$JAX_PROCESS_ID"; sleep 60 & wait'
    )
    job = Job(3, 2, ["bash", "-c", script], timeout=60, env={"READY": str(tmp_path)})
    assert job.wait() == 3
    for i in range(3):
        assert f"[p{i}] p{i} of 3 at 127.0.0.1:" in job.output
        assert "--xla_force_host_platform_device_count=2" in job.output
    assert "[local] p1 exited with 3; stopping the others" in job.output
    assert job.output.count("stopped") == 2
    # a preempted process (143) leaves the others time to finish the checkpoint they save with it
    preempted = 'if [ "$JAX_PROCESS_ID" = 0 ]; then exit 143; fi; sleep 2; echo saved; exit 143'
    job = Job(2, 1, ["bash", "-c", preempted], timeout=60)
    assert job.wait() == 143 and "[p1] saved" in job.output and "stopping" not in job.output
    slow = Job(2, 1, ["sleep", "30"], timeout=2)
    assert slow.wait() == 124 and "timeout: still running after 2 s" in slow.output


def test_each_process_has_its_devices_and_real_collectives():
    code = (
        "from pathor1_jax.sharding.multihost import maybe_initialize_distributed\n"
        "assert maybe_initialize_distributed()\n"
        "import jax, numpy as np\n"
        "from jax.sharding import NamedSharding, PartitionSpec as P\n"
        "mesh = jax.make_mesh((4,), ('d',), axis_types=(jax.sharding.AxisType.Auto,))\n"
        "local = np.full((2,), jax.process_index() + 1.0, np.float32)\n"
        "x = jax.make_array_from_process_local_data(NamedSharding(mesh, P('d')), local)\n"
        "total = jax.jit(lambda x: x.sum(), out_shardings=NamedSharding(mesh, P()))(x)\n"
        "print('process', jax.process_index(), jax.process_count(), jax.local_device_count(), float(total))\n"
    )
    job = run_ok(Job(2, 2, [sys.executable, "-c", code], timeout=240))
    for i in range(2):
        assert f"[p{i}] process {i} 2 2 6.0" in job.output  # 1 + 1 + 2 + 2 over 4 devices


def test_sft_with_images_is_the_same_on_1x4_and_on_2x2_across_a_dcn_axis(tmp_path):
    """The 2-process run lays its mesh out as two slices would (`mesh.dcn.data=2`: the data axis across
    the processes, FSDP within each); the 1-process run is FSDP over 4 devices."""
    multislice = tmp_path / "multislice.py"
    multislice.write_text(
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('demo_sft', {str(REPO / 'configs/demo_sft.py')!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n\n\n"
        "def get_config():\n"
        "    config = module.get_config()\n"
        "    config.mesh = dict(data=1, fsdp=-1, tensor=1, dcn=dict(data=2))\n"
        "    return config\n"
    )
    args = [
        "--config.model.init_from=", "--config.train.steps=2", "--config.optim.warmup_steps=1",
        "--config.data.shards=2", "--config.data.batch_size=2",
    ]  # fmt: skip
    one, two = tmp_path / "1x4", tmp_path / "2x2"
    # both layouts at once: the single process's start-up and compilation, mostly on one core,
    # overlap the two processes' (tests' wall time on 2 cores)
    run_all_ok(
        train(1, 4, one, "--config", str(REPO / "configs/demo_sft.py"), *args),
        train(2, 2, two, "--config", str(multislice), *args),
    )
    assert_same_losses(losses(one), losses(two), range(1, 3))
    assert_close_trees(checkpoint_state(one, 2)["params"], checkpoint_state(two, 2)["params"])


def test_grpo_with_rollouts_is_the_same_on_1x4_and_2x2(tmp_path):
    """GRPO, each process generating for its own prompts. DAPO runs the same rollout and update code
    across processes (its dynamic sampling and overlong penalty act on the whole rollout, which every
    process holds): they are tested in one process, tests/test_rl_step.py and test_rl_train.py."""

    def job(n: int, d: int) -> Job:
        run = [
            "--config", str(REPO / "configs/grpo_tiny.py"), "--workdir", str(tmp_path / f"{n}x{d}"),
            "--config.model.init_from=", "--config.train.steps=2", "--config.rl.max_new_tokens=8",
        ]  # fmt: skip
        return Job(n, d, [sys.executable, str(REPO / "tests/multihost_rl.py"), *run], timeout=900)

    run_all_ok(job(1, 4), job(2, 2))  # both layouts at once, as for SFT
    one, two = tmp_path / "1x4", tmp_path / "2x2"
    a, b = metrics(one), metrics(two)
    for step in (1, 2):
        assert a[step]["reward/mean"] == b[step]["reward/mean"]  # the same rollouts
        assert 0 < a[step]["reward/accuracy"] < 1  # real advantages
        # the policy loss is a near-cancelling mean of ratio · advantage (advantages of a group sum
        # to 0): equal up to float32 rounding of terms of size ~1
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-5, abs=1e-6), step
        assert a[step]["update/grad_norm"] == pytest.approx(b[step]["update/grad_norm"], rel=1e-4), step
    assert_close_trees(checkpoint_state(one, 2)["params"], checkpoint_state(two, 2)["params"])


def test_clip_across_layouts_faults_and_resume(tmp_path):
    """One CLIP run of 12 steps, straight on 1 process × 4 devices, against the same run continued
    from the straight run's step-2 checkpoint (written by 1 process) and interrupted twice: resumed on
    2 processes × 2 devices, SIGTERM to one of them, the other agrees; resumed on 2 processes, SIGKILL
    of one while it saves, the other stops by itself; resumed on 1 process with another mesh shape.
    Every step's loss and the final parameters are the straight run's: the contrastive step is the
    same on both layouts, and checkpoints move from 1 process to 2 and back. (SIGTERM to a single
    process: tests/test_train_loop.py, test_cli_errors.py.)"""
    steps, start = 12, 2
    args = [*CLIP, f"--config.train.steps={steps}"]
    straight, run = tmp_path / "straight", tmp_path / "interrupted"
    run_ok(train(1, 4, straight, *args, f"--config.train.ckpt_every={start}"))
    expected = losses(straight)
    args.append("--config.train.ckpt_every=1")

    # the interrupted run: the straight run's directory as it was after step 2
    shutil.copytree(straight, run)
    for checkpoint in (run / "checkpoints").iterdir():
        if checkpoint.name != str(start):
            shutil.rmtree(checkpoint)
    records = [r for r in (run / "metrics.jsonl").read_text().splitlines() if json.loads(r)["step"] <= start]
    (run / "metrics.jsonl").write_text("".join(r + "\n" for r in records))

    # resumed on 2 processes; SIGTERM to process 1 only: both stop at one step, one checkpoint
    job = train(2, 2, run, *args)
    wait_for(lambda: max(losses(run)) >= start + 2, 300, "2 resumed steps", job)
    job.signal(1, signal.SIGTERM)
    assert job.wait() == 143, job.output[-3000:]
    assert f"steps {start}->" in job.output
    second = complete_steps(run)[-1]
    assert start + 2 <= second < steps
    assert_same_losses(losses(run), expected, range(1, second + 1))

    # resumed on 2 processes; SIGKILL of process 1 while a checkpoint is being written
    job = train(2, 2, run, *args, heartbeat_s=20, wait_for_others=True)
    tmp = lambda: any(".orbax-checkpoint-tmp" in p.name for p in (run / "checkpoints").iterdir())  # noqa: E731
    wait_for(lambda: max(losses(run)) > second and tmp(), 300, "a save in flight", job)
    job.signal(1, signal.SIGKILL)
    killed = time.monotonic()
    rc = job.wait()
    noticed = time.monotonic() - killed
    assert rc != 0 and "lost contact with another process" in job.output, job.output[-3000:]
    assert noticed < 60, f"the survivor took {noticed:.0f} s to stop"
    print(f"survivor stopped {noticed:.1f} s after its peer was killed")
    third = complete_steps(run)
    for step in third:  # every checkpoint that looks complete is complete
        checkpoint_state(run, step)
    third = third[-1]

    # resumed on 1 process, mesh fsdp=2 × tensor=2: to the end
    job = run_ok(train(1, 4, run, *args, "--config.mesh.fsdp=2", "--config.mesh.tensor=2"))
    assert f"steps {third}->{steps}" in job.output
    assert_same_losses(losses(run), expected, range(1, steps + 1))
    assert_close_trees(checkpoint_state(run, steps)["params"], checkpoint_state(straight, steps)["params"])


def test_unwritable_run_directory_stops_every_process_at_start_up(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    job = Job(2, 1, [sys.executable, "-m", "pathor1_jax.cli", "train", "--workdir", str(blocker / "run"),
                     *CLIP], timeout=240, wait_for_others=True)  # fmt: skip
    assert job.wait() == 2, job.output[-3000:]
    for i in range(2):  # each process says so itself, before any compilation
        assert f"[p{i}] pathor1 train: error: " in job.output and str(blocker) in job.output
    assert "Compiling" not in job.output

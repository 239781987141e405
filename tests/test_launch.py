"""`launch/*.sh --dry-run` prints the exact commands a run would execute."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/qwen2_5_vl_7b.py"
CLEAN = {k: v for k, v in os.environ.items() if k not in (
    "COORDINATOR_ADDRESS", "MASTER_ADDR", "MASTER_PORT", "NUM_PROCESSES", "NNODES", "WORLD_SIZE",
    "PROCESS_ID", "NODE_RANK", "RANK")}  # fmt: skip


def launch(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(REPO / "launch" / script), *args],
        capture_output=True, text=True, env={**CLEAN, **(env or {})}, timeout=30,
    )  # fmt: skip


def test_tpu_pod_dry_run_prints_install_start_and_log_commands():
    out = launch("tpu_pod.sh", "--tpu", "pod-1", "--zone", "us-central2-b", "--project", "lab",
                 "--config", CONFIG, "--dry-run",
                 "--", "--steps", "10", "--run-name", "it's a test")  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = [shlex.split(line) for line in out.stdout.strip().splitlines()]
    where = ["--zone=us-central2-b", "--project=lab"]
    ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod-1"]
    tarball = "/tmp/pathor1_jax-src.tar.gz"
    assert lines[0] == ["git", "-C", str(REPO), "archive", "--format=tar.gz", "-o", tarball, "HEAD"]
    assert lines[1] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball,
                        "pod-1:~/pathor1_jax-src.tar.gz", "--worker=all", *where]  # fmt: skip
    assert lines[2][:-1] == [*ssh, "--worker=all", *where, "--command"]
    assert lines[2][-1] == (
        "mkdir -p ~/pathor1_jax && tar -xzf ~/pathor1_jax-src.tar.gz -C ~/pathor1_jax"
        " && python3 -m pip install -q -U 'jax[tpu]' && python3 -m pip install -q -e ~/pathor1_jax"
    )
    assert lines[3][:-1] == [*ssh, "--worker=all", *where, "--command"]
    remote = lines[3][-1]
    assert remote.startswith("cd ~/pathor1_jax && PATHOR1_MULTIHOST=1 setsid nohup python3 -m")
    assert remote.endswith("> ~/pathor1_train.log 2>&1 < /dev/null &")
    # the remote shell sees the train arguments exactly as given here
    train = shlex.split(remote.split("nohup ", 1)[1].split(" >", 1)[0])
    assert train == ["python3", "-m", "pathor1_jax.cli", "train", "--config", CONFIG,
                     "--steps", "10", "--run-name", "it's a test"]  # fmt: skip
    assert lines[4] == [*ssh, "--worker=0", *where, "--command", "tail -n +1 -F ~/pathor1_train.log"]
    assert len(lines) == 5


def test_tpu_pod_no_install_and_errors():
    out = launch("tpu_pod.sh", "--tpu", "p", "--zone", "z", "--config", CONFIG, "--no-install", "--dry-run")
    assert out.returncode == 0 and len(out.stdout.strip().splitlines()) == 2
    assert "--project" not in out.stdout
    missing = launch("tpu_pod.sh", "--zone", "z", "--config", CONFIG, "--dry-run")
    assert missing.returncode == 2 and "--tpu is required" in missing.stderr
    outside = launch("tpu_pod.sh", "--tpu", "p", "--zone", "z", "--config", "/nonexistent/c.py", "--dry-run")
    assert outside.returncode == 2 and "must be a path inside the checkout" in outside.stderr


def test_gpu_single_host_dry_run():
    out = launch("gpu.sh", "--config", CONFIG, "--gpus", "4", "--dry-run", "--", "--steps", "3")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines() == [
        f"env CUDA_VISIBLE_DEVICES=0,1,2,3 python3 -m pathor1_jax.cli train --config {CONFIG} --steps 3"
    ]


@pytest.mark.parametrize(
    "env",
    [
        {"COORDINATOR_ADDRESS": "10.0.0.1:1234", "NUM_PROCESSES": "4", "PROCESS_ID": "2"},
        {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234", "NNODES": "4", "NODE_RANK": "2"},
    ],
)
def test_gpu_multi_node_dry_run_reads_cluster_from_env(env):
    out = launch("gpu.sh", "--config", CONFIG, "--install", "--dry-run", env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines() == [
        "python3 -m pip install -q -U 'jax[cuda12]'",
        f"python3 -m pip install -q -e {REPO}",
        "env JAX_COORDINATOR_ADDRESS=10.0.0.1:1234 JAX_NUM_PROCESSES=4 JAX_PROCESS_ID=2 "
        f"python3 -m pathor1_jax.cli train --config {CONFIG}",
    ]


def test_gpu_errors():
    no_coord = launch("gpu.sh", "--config", CONFIG, "--dry-run", env={"NUM_PROCESSES": "2"})
    assert no_coord.returncode == 2 and "no COORDINATOR_ADDRESS" in no_coord.stderr
    bad_rank = launch("gpu.sh", "--config", CONFIG, "--dry-run",
                      env={"COORDINATOR_ADDRESS": "h:1", "NUM_PROCESSES": "2",
                           "PROCESS_ID": "2"})  # fmt: skip
    assert bad_rank.returncode == 2 and "PROCESS_ID 2 must be below NUM_PROCESSES 2" in bad_rank.stderr
    assert launch("gpu.sh", "--dry-run").returncode == 2


def test_gpu_plain_single_process():
    out = launch("gpu.sh", "--config", CONFIG, "--dry-run")
    assert out.stdout.strip().splitlines() == [f"python3 -m pathor1_jax.cli train --config {CONFIG}"]


@pytest.mark.parametrize("code", [0, 143, 2])
def test_gpu_passes_the_exit_status_on_and_reads_143_as_resume(tmp_path, code):
    """Preemption (143) reaches the scheduler distinct from success, with a 'rerun to resume' line."""
    fake = tmp_path / "python3"
    fake.write_text(f"#!/bin/sh\nexit {code}\n")
    fake.chmod(0o755)
    out = launch("gpu.sh", "--config", CONFIG, env={"PATH": f"{tmp_path}:{os.environ['PATH']}"})
    assert out.returncode == code
    assert ("rerun the same command to resume" in out.stderr) == (code == 143)


def test_tpu_multislice_dry_run_runs_every_step_on_every_slice():
    out = launch("tpu_pod.sh", "--tpu", "ms", "--zone", "z", "--config", CONFIG, "--slices", "2", "--dry-run")
    assert out.returncode == 0, out.stderr
    lines = [shlex.split(line) for line in out.stdout.strip().splitlines()]
    gcloud = ["gcloud", "compute", "tpus", "tpu-vm"]
    assert [line[:6] for line in lines[1:]] == [
        [*gcloud, "scp", "/tmp/pathor1_jax-src.tar.gz"], [*gcloud, "ssh", "ms-0"],
        [*gcloud, "scp", "/tmp/pathor1_jax-src.tar.gz"], [*gcloud, "ssh", "ms-1"],
        [*gcloud, "ssh", "ms-0"], [*gcloud, "ssh", "ms-1"], [*gcloud, "ssh", "ms-0"],
    ]  # fmt: skip
    assert lines[3][6] == "ms-1:~/pathor1_jax-src.tar.gz"
    for start in lines[5:7]:
        assert start[6] == "--worker=all" and "PATHOR1_MULTIHOST=1" in start[-1]
    assert lines[7][6] == "--worker=0" and lines[7][-1].startswith("tail")
    bad = launch("tpu_pod.sh", "--tpu", "ms", "--zone", "z", "--config", CONFIG, "--slices", "0", "--dry-run")
    assert bad.returncode == 2 and "--slices must be a positive integer" in bad.stderr


def test_slurm_dry_run_prints_sbatch_and_a_requeueing_batch_script():
    out = launch("slurm.sh", "--config", CONFIG, "--nodes", "4", "--partition", "gpu", "--time", "24:00:00",
                 "--dry-run", "--", "--config.train.steps=10",
                 "--config.train.out_dir=runs/it's")  # fmt: skip
    assert out.returncode == 0, out.stderr
    sbatch, *script = out.stdout.strip().splitlines()
    assert shlex.split(sbatch) == [
        "sbatch", "--job-name=pathor1", "--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--requeue",
        "--signal=TERM@120", "--open-mode=append", "--output=pathor1-%j.log", "--partition=gpu",
        "--time=24:00:00",
    ]  # fmt: skip
    assert script[0] == "#!/usr/bin/env bash" and shlex.split(script[1]) == ["cd", str(REPO)]
    srun = shlex.split(next(line for line in script if line.startswith("srun")).split(" ||")[0])
    assert srun == ["srun", "python3", "-m", "pathor1_jax.cli", "train", "--config", CONFIG,
                    "--config.train.steps=10", "--config.train.out_dir=runs/it's"]  # fmt: skip
    assert 'if [[ "$status" == 143 ]]; then' in script and any("scontrol requeue" in s for s in script)
    missing = launch("slurm.sh", "--config", CONFIG, "--dry-run")
    assert missing.returncode == 2 and "--config and --nodes are required" in missing.stderr


def test_slurm_batch_script_requeues_on_143_only(tmp_path):
    """The batch script itself, run with fake srun/scontrol: exit status passed on, requeue on 143."""
    out = launch("slurm.sh", "--config", CONFIG, "--nodes", "2", "--dry-run")
    script = tmp_path / "job.sh"
    script.write_text("\n".join(out.stdout.strip().splitlines()[1:]) + "\n")
    for code in (0, 143, 1):
        (tmp_path / "srun").write_text(f"#!/bin/sh\nexit {code}\n")
        (tmp_path / "scontrol").write_text(f'#!/bin/sh\necho "scontrol $@" > {tmp_path}/requeued\n')
        for tool in ("srun", "scontrol"):
            (tmp_path / tool).chmod(0o755)
        (tmp_path / "requeued").unlink(missing_ok=True)
        env = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_JOB_ID": "77"}
        run = subprocess.run(["bash", str(script)], env={**CLEAN, **env}, capture_output=True, text=True)
        assert run.returncode == code
        requeued = tmp_path / "requeued"
        assert (requeued.read_text().strip() if requeued.exists() else None) == (
            "scontrol requeue 77" if code == 143 else None
        )

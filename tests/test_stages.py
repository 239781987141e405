"""The registry of the paper's stages: its entries resolve and their demo configs agree with them,
`pathor1 train` dispatches through it (refusing unknown stages and wrong record kinds), and the
demo walk starts each stage from the right run."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pathor1_jax import stages
from pathor1_jax.cli import main
from pathor1_jax.train.config import load_config
from pathor1_jax.train.result import StageResult

CALLS: list[dict] = []  # what the fake stage below was run with


def fake_run(config, out_dir=None) -> StageResult:
    """A stage that trains nothing: records its config and reports (and writes the metrics of) `steps`
    steps from loss 2 to 1."""
    CALLS.append({"out_dir": config.train.out_dir, "init_from": config.model.init_from,
                  "steps": config.train.steps, "warmup": config.optim.warmup_steps,
                  "kind": config.data.kind})  # fmt: skip
    run_dir = Path(out_dir or config.train.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    last = json.dumps({"step": config.train.steps, "loss": 1.0})
    (run_dir / "metrics.jsonl").write_text(f'{{"step": 1, "loss": 2.0}}\n{last}\n')
    return StageResult(config.stage, run_dir, run_dir / "metrics.jsonl", 0, config.train.steps,
                       "loss", 2.0, 1.0, False)  # fmt: skip


@pytest.fixture
def no_plots(monkeypatch):
    """The demo's loss plot left out (matplotlib: ~1 s a walk) where a test walks fake stages."""
    from pathor1_jax.train import metrics

    monkeypatch.setattr(metrics, "plot_losses", lambda runs, out_png, **_: out_png)


def fake_eval(config, model_dir):
    return {} if model_dir is None else {"score": float(len(Path(model_dir).name))}


def test_the_paper_stages_in_demo_order():
    assert list(stages.STAGES) == ["curation", "cpt", "sft", "grpo", "dapo", "clip"]
    assert {e.name: e.records for e in stages.STAGES.values()} == {
        "curation": None, "cpt": "caption", "sft": "chat", "grpo": "mcq", "dapo": "mcq", "clip": "caption"
    }  # fmt: skip


def test_reading_the_registry_imports_no_stage():
    code = "import sys, pathor1_jax.stages; print(sorted({'jax', 'flax', 'numpy'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", list(stages.STAGES))
def test_entries_resolve_and_their_demo_configs_are_theirs(name):
    entry = stages.STAGES[name]
    for ref in (entry.run, entry.demo.evaluate, entry.demo.run):
        if ref:
            assert callable(stages.resolve(ref)), ref
    assert bool(entry.demo.configs) != bool(entry.demo.run), "a demo runs configs or a function"
    assert (entry.run is None) == (entry.records is None) == (name == "curation")
    for spec in entry.demo.configs:
        config = load_config(str(stages.CONFIGS / spec))
        assert config.stage == name, spec
        assert config.data.get("kind", entry.records) in ("", entry.records), spec
        for key in entry.demo.evaluate_reads:  # what the evaluator is given is in the config
            parent, _, leaf = key.rpartition(".")
            assert leaf in (config[parent] if parent else config), (spec, key)


def test_train_refuses_an_unknown_stage_and_the_wrong_records(tmp_path, capsys):
    common = ["--config", "configs/demo_sft.py", f"--config.train.out_dir={tmp_path}"]
    trained = "['cpt', 'sft', 'grpo', 'dapo', 'clip']"
    assert main(["train", *common, "--config.stage=rlhf"]) == 2
    assert capsys.readouterr().err == (
        f"pathor1 train: error: config.stage='rlhf': expected one of {trained}\n"
    )
    assert main(["train", *common, "--config.stage=curation"]) == 2
    assert capsys.readouterr().err == (
        "pathor1 train: error: config.stage='curation': data curation is not a training stage; "
        f"expected one of {trained}\n"
    )
    assert main(["train", *common, "--config.data.kind=caption"]) == 2
    assert capsys.readouterr().err == (
        "pathor1 train: error: config.data.kind='caption' but stage 'sft' trains on 'chat' records\n"
    )
    assert not (tmp_path / "checkpoints").exists()


def test_train_runs_the_entry_of_config_stage(tmp_path, monkeypatch, capsys):
    fake = dataclasses.replace(stages.STAGES["sft"], run="test_stages:fake_run")
    monkeypatch.setitem(stages.STAGES, "sft", fake)
    CALLS.clear()
    args = ["--config", "configs/demo_sft.py", f"--config.train.out_dir={tmp_path}", "--config.train.steps=3"]
    assert main(["train", *args]) == 0
    assert CALLS == [
        {"out_dir": str(tmp_path), "init_from": "runs/demo/cpt", "steps": 3, "warmup": 5, "kind": "chat"}
    ]  # base_config's empty data.kind became the registry's records of sft
    assert f"sft: steps 0->3, loss 2.0 -> 1.0; done; run directory {tmp_path}" in capsys.readouterr().out


def test_demo_walk_starts_from_the_last_run_of_start_from(tmp_path, monkeypatch):
    """Two chained configs in `<stage>/<arg>`, the first starting from the latest run among
    `start_from`; steps and warmup shortened; evaluations before and after; one combined result."""
    (tmp_path / "toy.py").write_text(
        "import ml_collections\n"
        "def get_config(arg='a'):\n"
        "    return ml_collections.ConfigDict(dict(stage='toy', data=dict(kind='chat'),\n"
        "        model=dict(init_from=''), optim=dict(warmup_steps=5), train=dict(steps=40, out_dir='')))\n"
    )
    monkeypatch.setattr(stages, "CONFIGS", tmp_path)
    demo = stages.Demo(("toy.py:a", "toy.py:b"), start_from=("cpt", "sft"), evaluate="test_stages:fake_eval")
    entry = stages.StageEntry("toy", "toy", "§0", "chat", "test_stages:fake_run", demo)
    monkeypatch.setitem(stages.STAGES, "toy", entry)
    ran = {"cpt": tmp_path / "cpt", "sft": tmp_path / "sft", "grpo": tmp_path / "grpo"}
    CALLS.clear()
    result = stages.run_demo(entry, tmp_path / "toy", ran, steps=16)
    a, b = str(tmp_path / "toy" / "a"), str(tmp_path / "toy" / "b")
    assert CALLS == [
        {"out_dir": a, "init_from": str(tmp_path / "sft"), "steps": 16, "warmup": 2, "kind": "chat"},
        {"out_dir": b, "init_from": a, "steps": 16, "warmup": 2, "kind": "chat"},
    ]
    assert (result.stage, result.out_dir, result.end_step) == ("toy", tmp_path / "toy", 32)
    assert result.metrics_path == tmp_path / "toy" / "b" / "metrics.jsonl"
    assert result.metrics_paths == (tmp_path / "toy" / "a" / "metrics.jsonl", result.metrics_path)
    assert result.evals == {"score": (3.0, 1.0)}  # before: the sft run; after: the last run ("b")
    CALLS.clear()
    result = stages.run_demo(entry, tmp_path / "toy", {}, steps=None)  # nothing to start from
    assert [c["init_from"] for c in CALLS] == ["", a]
    assert CALLS[0]["steps"] == 40 and CALLS[0]["warmup"] == 5
    assert result.evals == {"score": (None, 1.0)}


def chained_run(config, out_dir=None) -> StageResult:
    """A fake stage of chained runs: run "a" writes losses 4, 3, 2; run "b" 1.5, 1, 0.5."""
    run_dir = Path(out_dir or config.train.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    losses = [4.0, 3.0, 2.0] if run_dir.name == "a" else [1.5, 1.0, 0.5]
    (run_dir / "metrics.jsonl").write_text(
        "".join(f'{{"step": {i + 1}, "loss": {v}}}\n' for i, v in enumerate(losses))
    )
    return StageResult(
        config.stage, run_dir, run_dir / "metrics.jsonl", 0, 3, "loss", losses[0], losses[-1], False
    )


def test_demo_plots_and_summarises_every_run_of_a_chained_stage(tmp_path, monkeypatch, capsys):
    """A stage of chained runs (PathoCLIP I -> II): losses.png gets a panel per run, and the table's
    "first 3" are the first run's first steps, "last 3" the last run's last steps."""
    from pathor1_jax.train import metrics

    (tmp_path / "toy.py").write_text(
        "import ml_collections\n"
        "def get_config(arg):\n"
        "    return ml_collections.ConfigDict(dict(stage='clip', data=dict(kind='caption'),\n"
        "        model=dict(init_from=''), optim=dict(warmup_steps=0), train=dict(steps=3, out_dir='')))\n"
    )
    monkeypatch.setattr(stages, "CONFIGS", tmp_path)
    demo = stages.Demo(("toy.py:a", "toy.py:b"))
    monkeypatch.setitem(
        stages.STAGES,
        "clip",
        stages.StageEntry("clip", "clip", "§0", "caption", "test_stages:chained_run", demo),
    )
    plotted = []
    monkeypatch.setattr(
        metrics, "plot_losses", lambda runs, out_png, keys: plotted.append((runs, keys)) or out_png
    )
    assert main(["demo", "--out", str(tmp_path / "demo"), "--stages", "clip"]) == 0
    run = tmp_path / "demo" / "clip"
    assert plotted == [
        (
            [("clip a (loss)", run / "a" / "metrics.jsonl"), ("clip b (loss)", run / "b" / "metrics.jsonl")],
            ["loss", "loss"],
        )
    ]
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("clip "))
    assert row.split()[:6] == ["clip", "loss", "6", "3.0000", "1.0000", "-2.0000"]


def fake_data_stage(out_dir) -> StageResult:
    """A demo stage that trains nothing (as curation): writes one file, reports a recall and a note."""
    out_dir.mkdir(parents=True)
    (out_dir / "pairs.jsonl").write_text("{}\n")
    return StageResult("curation", out_dir, None, 0, 0, "recall", None, 0.75, False, note="3 of 4 found")


def test_demo_steps_cut_the_warmup_to_fit_and_say_so(tmp_path, monkeypatch, capsys, no_plots):
    """`pathor1 demo --steps N` trains N steps a stage with a warmup of at most N // 8 (none below 8
    steps: `--steps 1` works), and says so; `--steps 0` is a usage error before anything runs."""
    (tmp_path / "toy.py").write_text(
        "import ml_collections\n"
        "def get_config():\n"
        "    return ml_collections.ConfigDict(dict(stage='sft', data=dict(kind='chat'),\n"
        "        model=dict(init_from=''), optim=dict(warmup_steps=5), train=dict(steps=100, out_dir='')))\n"
    )
    monkeypatch.setattr(stages, "CONFIGS", tmp_path)
    fake = stages.StageEntry("sft", "sft", "§0", "chat", "test_stages:fake_run", stages.Demo(("toy.py",)))
    monkeypatch.setitem(stages.STAGES, "sft", fake)
    said = {}
    for steps in (1, 7, 16, 80):
        CALLS.clear()
        assert main(["demo", "--out", str(tmp_path / "demo"), "--stages", "sft", "--steps", str(steps)]) == 0
        assert [(c["steps"], c["warmup"]) for c in CALLS] == [(steps, min(5, steps // 8))]
        said[steps] = capsys.readouterr().out.splitlines()[0]
    assert said == {
        1: "sft (toy.py): --steps 1: train.steps=100 -> 1, optim.warmup_steps=5 -> 0",
        7: "sft (toy.py): --steps 7: train.steps=100 -> 7, optim.warmup_steps=5 -> 0",
        16: "sft (toy.py): --steps 16: train.steps=100 -> 16, optim.warmup_steps=5 -> 2",
        80: "sft (toy.py): --steps 80: train.steps=100 -> 80",
    }
    CALLS.clear()
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--out", str(tmp_path / "zero"), "--stages", "sft", "--steps", "0"])
    assert exit_.value.code == 2 and CALLS == [] and not (tmp_path / "zero").exists()
    assert "argument --steps: must be a positive integer, got 0" in capsys.readouterr().err


def test_demo_runs_a_data_stage_by_its_function_and_reports_its_note(tmp_path, monkeypatch, capsys):
    fake = dataclasses.replace(stages.STAGES["curation"], demo=stages.Demo(run="test_stages:fake_data_stage"))
    monkeypatch.setitem(stages.STAGES, "curation", fake)
    assert main(["demo", "--out", str(tmp_path), "--stages", "curation"]) == 0
    assert (tmp_path / "curation" / "pairs.jsonl").exists()
    assert not (tmp_path / "losses.png").exists()  # no training stage ran: nothing to plot
    rows = capsys.readouterr().out.splitlines()
    row = next(line for line in rows if line.startswith("curation "))
    assert row.split()[:5] == ["curation", "recall", "-", "-", "0.7500"]
    assert row.endswith("s  3 of 4 found")


EVALS: list[tuple[str, dict]] = []  # what counting_eval below measured: (run directory name, config)


def counting_eval(config, model_dir):
    EVALS.append((Path(model_dir).name, config.to_dict()))
    return {"score": float(len(EVALS))}


def test_the_demo_walk_measures_the_sft_run_once_for_grpo_and_dapo(tmp_path, monkeypatch, capsys, no_plots):
    """GRPO and DAPO both start from the SFT run: the walk measures it once and both rows show those
    numbers; the evaluator is given only the keys it reads. Read differently (another budget), the
    SFT run is measured again."""
    (tmp_path / "toy.py").write_text(
        "import ml_collections\n"
        "def get_config(arg):\n"
        "    stage, _, budget = arg.partition('-')\n"
        "    return ml_collections.ConfigDict(dict(stage=stage, data=dict(kind='chat'),\n"
        "        rl=dict(max_new_tokens=int(budget or 48), algo=stage), model=dict(init_from=''),\n"
        "        optim=dict(warmup_steps=0), train=dict(steps=4, out_dir='')))\n"
    )
    monkeypatch.setattr(stages, "CONFIGS", tmp_path)

    def walk(dapo_spec):
        for name, spec in (("sft", "toy.py:sft"), ("grpo", "toy.py:grpo"), ("dapo", dapo_spec)):
            measure = dict(evaluate="test_stages:counting_eval", evaluate_reads=("rl.max_new_tokens",))
            demo = stages.Demo((spec,), start_from=("sft",), **(measure if name != "sft" else {}))
            entry = stages.StageEntry(name, name, "§0", "chat", "test_stages:fake_run", demo)
            monkeypatch.setitem(stages.STAGES, name, entry)
        EVALS.clear()
        assert main(["demo", "--out", str(tmp_path / "demo"), "--stages", "sft,grpo,dapo"]) == 0
        rows = capsys.readouterr().out.splitlines()
        return {row.split()[0]: row.split("s  ")[-1] for row in rows if row.startswith(("grpo ", "dapo "))}

    budget = {"rl": {"max_new_tokens": 48}}
    assert walk("toy.py:dapo") == {"grpo": "score 1.000 -> 2.000", "dapo": "score 1.000 -> 3.000"}
    assert EVALS == [("sft", budget), ("grpo", budget), ("dapo", budget)]
    assert walk("toy.py:dapo-64") == {"grpo": "score 1.000 -> 2.000", "dapo": "score 3.000 -> 4.000"}
    assert [name for name, _ in EVALS] == ["sft", "grpo", "sft", "dapo"]
    assert EVALS[2] == ("sft", {"rl": {"max_new_tokens": 64}})


def test_demo_compile_settings_apply_only_before_jax_starts(tmp_path):
    """A fresh `pathor1 demo` process: LLVM's expensive passes off (beside the user's XLA flags) and the
    persistent compilation cache under --out unless one is named; a process that has imported jax (a
    test, a notebook) keeps its settings."""
    script = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from pathor1_jax.commands.demo import compile_settings\n"
        "if sys.argv[1] == 'jax': import jax\n"
        "compile_settings(Path(sys.argv[2]))\n"
        "print(os.environ.get('XLA_FLAGS', '-'), os.environ.get('JAX_COMPILATION_CACHE_DIR', '-'))\n"
    )

    def settings(mode, env):
        names = ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")
        env = {k: v for k, v in os.environ.items() if k not in names} | env
        out = subprocess.run([sys.executable, "-c", script, mode, str(tmp_path / "demo")], env=env,
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
        return out.split()

    cache = str(tmp_path / "demo" / "jax_cache")
    assert settings("fresh", {}) == ["--xla_llvm_disable_expensive_passes=true", cache]
    assert settings("fresh", {"XLA_FLAGS": "--xla_cpu_x=1", "JAX_COMPILATION_CACHE_DIR": "/c"}) == [
        "--xla_cpu_x=1",
        "--xla_llvm_disable_expensive_passes=true",
        "/c",
    ]
    assert settings("jax", {"XLA_FLAGS": "--xla_cpu_x=1"}) == ["--xla_cpu_x=1", "-"]

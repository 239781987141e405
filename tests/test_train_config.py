"""Config files and `--config.key=value` overrides (no JAX compilation here)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pathor1_jax.cli import main
from pathor1_jax.models.qwen2_5_vl.config import tiny_config
from pathor1_jax.train.config import ConfigError, load_config, parse_overrides
from pathor1_jax.train.run import model_config
from pathor1_jax.train.rundir import check_init_run

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
OURS = ["demo_cpt.py", "demo_sft.py", "cpt_3b.py", "sft_3b.py", "cpt_7b.py", "sft_7b.py"]


def test_overrides_are_parsed_to_the_type_they_replace():
    config = load_config(
        str(CONFIGS / "demo_sft.py"),
        [
            "--config.optim.lr=1e-4",
            "--config.train.steps",
            "7",
            "--config.data.packing=false",
            "--config.freeze=('^model[.]visual[.]', 'lm_head')",
            "--config.model.init_from=runs/x",
        ],
    )
    assert config.optim.lr == 1e-4 and isinstance(config.optim.lr, float)
    assert config.train.steps == 7 and isinstance(config.train.steps, int)
    assert config.data.packing is False
    assert config.freeze == ("^model[.]visual[.]", "lm_head")
    assert config.model.init_from == "runs/x"
    with pytest.raises(AttributeError):  # locked: no new keys after loading
        config.optim.new_key = 1


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "--config.optim.lrr=1e-5",
            r"unknown config key 'optim.lrr': 'lrr' is not a key of optim \(known: b1,",
        ),
        (
            "--config.optimizer.lr=1",
            r"unknown config key 'optimizer.lr': 'optimizer' is not a key of the top",
        ),
        ("--config.train.steps=ten", r"--config.train.steps=ten: not a int literal"),
        ("--config.train.steps=1.5", r"expected int like the default 80, got float"),
        ("--config.data.packing=maybe", r"expected a boolean"),
        ("--config.optim=1", r"--config.optim: is a block of keys"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(str(CONFIGS / "demo_cpt.py"), [override])


def test_parse_overrides_rejects_other_arguments():
    assert parse_overrides(["--config.a.b=1", "--config.c", "x=y"]) == [("a.b", "1"), ("c", "x=y")]
    with pytest.raises(ConfigError, match="unexpected argument '--steps'"):
        parse_overrides(["--steps", "3"])
    with pytest.raises(ConfigError, match="--config.a: missing a value"):
        parse_overrides(["--config.a"])


def test_missing_config_file_and_missing_get_config(tmp_path):
    with pytest.raises(ConfigError, match="nope.py: no such file"):
        load_config(str(tmp_path / "nope.py"))
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(ConfigError, match="defines no get_config"):
        load_config(str(empty))


def test_cli_unknown_key_exits_2_naming_it(capsys):
    rc = main(["train", "--config", str(CONFIGS / "demo_cpt.py"), "--config.train.stepz=3"])
    assert rc == 2
    assert "unknown config key 'train.stepz'" in capsys.readouterr().err


@pytest.mark.parametrize("name", OURS)
def test_configs_load_with_a_known_stage_and_model(name):
    config = load_config(str(CONFIGS / name))
    assert config.stage in ("cpt", "sft")
    assert config.data.kind == ""  # the stage's records: the registry's, set by stages.run
    assert config.model.preset in ("tiny", "3b", "7b")
    assert 0 < config.optim.warmup_steps < config.train.steps


def _run_dir(run: Path, config: str, **model) -> Path:
    """A run directory of `config` as `init_from` sees it before loading: run_config.json (its model
    block with `model` over it) and checkpoints/."""
    (run / "checkpoints").mkdir(parents=True)
    block = {**load_config(str(CONFIGS / config)).model.to_dict(), **model}
    (run / "run_config.json").write_text(json.dumps({"model": block}))
    return run


@pytest.mark.parametrize(
    "config, run_config, run_model, message",
    [
        (
            "demo_sft.py",
            "demo_cpt.py",
            {"scan_layers": True},
            r"that run's checkpoint has its layers stacked \(model.scan_layers=True\); "
            r"set config.model.scan_layers=True$",
        ),
        (
            "demo_sft.py",
            "demo_cpt.py",
            {"path": "HF"},
            r"that run trained another architecture \(text_config.num_hidden_layers 3 there, 2 here\); "
            r"set config.model as that run's \(preset='tiny', path='.*HF'\)$",
        ),
        (  # PathoCLIP stage II from a stage I of another tower size
            "pathoclip_tiny.py:stage2",
            "pathoclip_tiny.py:stage1",
            {"preset": "ViT-B-16"},
            r"that run trained another architecture \(.*vision_config.hidden_size 768 there, \d+ here.*\); "
            r"set config.model as that run's \(preset='ViT-B-16'\)$",
        ),
    ],
)
def test_init_from_a_run_of_another_model_is_refused_at_start_up(
    tmp_path, capsys, config, run_config, run_model, message
):
    """A stage from a run that built another model: exit 2 with one line naming what differs, before
    any model is built and with nothing left in the run directory (the checkpoint would not load)."""
    if "path" in run_model:
        hf = tmp_path / "HF"
        hf.mkdir()
        (hf / "config.json").write_text(json.dumps(tiny_config(num_hidden_layers=3).to_hf_dict()))
        run_model = {"path": str(hf)}
    run = _run_dir(tmp_path / "before", run_config, **run_model)
    out = tmp_path / "after"
    argv = ["train", "--config", str(CONFIGS / config), f"--config.model.init_from={run}"]
    assert main([*argv, f"--config.train.out_dir={out}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"pathor1 train: error: config.model.init_from={str(run)!r}: "), err
    assert re.search(message, err), err
    assert not out.exists()


@pytest.mark.parametrize("run_model", [{"preset": "tiny_v0"}, {"preset": "", "path": "gone/HF"}])
def test_init_from_a_run_whose_model_cannot_be_read_is_left_to_the_restore(tmp_path, run_model):
    """A run whose model block names a preset this version does not know, or a `model.path` that is
    gone, is not refused by the start-up check (its architecture may well be this one's): the restore
    reports a checkpoint that does not fit. Only what can be compared is compared."""
    config = load_config(str(CONFIGS / "demo_sft.py"))
    run = _run_dir(tmp_path / "before", "demo_cpt.py", **run_model)
    assert check_init_run(config.model, run, lambda m: model_config(m).to_hf_dict()) is None
    stacked = _run_dir(tmp_path / "stacked", "demo_cpt.py", scan_layers=True, **run_model)
    with pytest.raises(ConfigError, match=r"layers stacked"):
        check_init_run(config.model, stacked, lambda m: model_config(m).to_hf_dict())

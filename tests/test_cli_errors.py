"""The command line's error contract (pathor1_jax.errors): bad input is one line and exit 2, a run that
stops itself one line and exit 1, --debug adds the traceback, Ctrl-C exits 130, preemption 143."""

from __future__ import annotations

import types
from pathlib import Path

import pytest

from pathor1_jax import cli
from pathor1_jax.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED, Pathor1Error, UserError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture
def fake_command(monkeypatch):
    """Registers `pathor1 fake`, whose run raises (or returns) what the test sets in `behaviour`."""
    behaviour = {}

    def run(args):
        if "raise" in behaviour:
            raise behaviour["raise"]
        return behaviour.get("return", 0)

    module = types.SimpleNamespace(add_arguments=lambda parser: None, run=run)
    monkeypatch.setitem(cli.COMMANDS, "fake", ("fake_module", "a test command"))
    monkeypatch.setattr(cli.importlib, "import_module", lambda name: module)
    return behaviour


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(
    "error, code",
    [
        (UserError("config.train.keep=0: must be >= 1"), 2),
        (Pathor1Error("loss is nan at step 3; stopped before saving"), 1),
        (FileNotFoundError(2, "No such file or directory", "/data/x.jsonl"), 2),
        (OSError(28, "No space left on device", "/runs/a"), 2),
    ],
)
def test_known_errors_are_one_line_and_their_exit_code(fake_command, capsys, error, code):
    fake_command["raise"] = error
    assert cli.main(["fake"]) == code
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("pathor1 fake: error: ")
    if isinstance(error, OSError):
        assert line.endswith(f"{error.filename}: {error.strerror}")


def test_debug_anywhere_adds_the_traceback(fake_command, capsys):
    fake_command["raise"] = UserError("bad value")
    assert cli.main(["fake", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.rstrip().endswith("error: bad value")
    assert cli.main(["--debug", "fake"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_bugs_keep_their_traceback_and_ctrl_c_exits_130(fake_command, capsys):
    fake_command["raise"] = ZeroDivisionError("a bug")
    with pytest.raises(ZeroDivisionError):
        cli.main(["fake"])
    fake_command["raise"] = KeyboardInterrupt()
    assert cli.main(["fake"]) == EXIT_INTERRUPTED


def test_config_with_a_syntax_error_names_file_and_line(tmp_path, capsys):
    """F13: a config file with a syntax error was a traceback."""
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config():\n    return (\n")
    assert cli.main(["train", "--config", str(bad)]) == 2
    assert f"config file {bad}:2: syntax error" in _one_line(capsys.readouterr().err)


def test_preempted_training_exits_143(monkeypatch, capsys, tmp_path):
    """F13: a run stopped by SIGTERM exited 0, like a finished one; now 143 after its checkpoint."""
    import pathor1_jax.train.run as run_module

    def fake_run_lm(config, workdir=None):
        return types.SimpleNamespace(
            preempted=True, start_step=0, end_step=1, metric="loss", first=1.0, last=1.0, out_dir=tmp_path
        )

    monkeypatch.setattr(run_module, "run_lm", fake_run_lm)
    assert cli.main(["train", "--config", str(CONFIGS / "demo_cpt.py")]) == EXIT_PREEMPTED
    assert "rerun the same command to resume" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["shardings", "--config", "configs/demo_cpt.py", "--devices", "-4"], "--devices: must be"),
        (["eval", "mcq", "--model", "m", "--data", "demo", "--batch-size", "-1"], "--batch-size: must be a"),
        (["generate", "--model", "m", "--image", "i", "--prompt", "p", "--max-new-tokens", "0"], "positive"),
        (["generate", "--model", "m", "--image", "i", "--prompt", "p", "--temperature", "-1"], ">= 0"),
        (["generate", "--model", "m", "--image", "i", "--prompt", "p", "--top-p", "0"], "in (0, 1]"),
    ],
)
def test_flags_out_of_range_are_usage_errors(capsys, argv, message):
    """F10, F12, F13: negative batch sizes, device counts, token budgets, temperatures were accepted."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err

"""Issue 15, one test per row (F1–F13): a run never hangs, never loses or poisons the model, and
refuses bad input at start-up. Each test is the issue's repro; the trainer ones share the toy model
and data of `test_train_loop` (compiled once per process)."""

from __future__ import annotations

import json
import logging

import pytest

from pathor1_jax.errors import UserError
from pathor1_jax.train.metrics import MetricsWriter, read_metrics

# F3: strict metrics: a NaN loss is null with a flag --------------------------------------------


def test_f3_nan_metrics_are_null_with_a_flag(tmp_path):
    writer = MetricsWriter(tmp_path)
    writer.write(1, {"loss": float("nan"), "grad_norm": float("inf"), "lr": 0.1})
    writer.close()
    line = (tmp_path / "metrics.jsonl").read_text()
    assert json.loads(line) == {"step": 1, "loss": None, "grad_norm": None, "lr": 0.1,
                                "nonfinite_keys": ["loss", "grad_norm"]}  # fmt: skip


# F6: a torn last line of metrics.jsonl (kill -9 mid-write) does not block the resume ------------


def test_f6_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    with caplog.at_level(logging.WARNING):
        assert [r["step"] for r in read_metrics(path)] == [1, 2]
        MetricsWriter(tmp_path, resume_step=2).close()  # what a resume does first
    assert "metrics.jsonl:3: dropped a torn last line" in caplog.text
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')  # damage elsewhere: an error naming it
    with pytest.raises(UserError, match=r"metrics.jsonl:2: not a JSON object"):
        read_metrics(path)

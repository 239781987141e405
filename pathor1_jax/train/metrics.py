"""Metrics: one JSON object per step in `metrics.jsonl` and the same scalars in TensorBoard, written
by process 0 only; loss curves as PNG (matplotlib, Agg backend) at the end of a run.

The file is strict JSON Lines: a non-finite value (a diverging loss) is written as `null` and its
key listed in the record's `"nonfinite_keys"`. Readers drop a torn last line (a process killed
mid-write) with a warning; a malformed line elsewhere is an error naming file and line.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax

from pathor1_jax.errors import UserError

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
NONFINITE_KEYS = "nonfinite_keys"


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a metrics JSONL file; a torn last line is dropped with a warning."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError as e:
            if all(not rest.strip() for rest in lines[number:]):
                log.warning("%s:%d: dropped a torn last line (%s)", path, number, e)
                break
            raise UserError(f"{path}:{number}: not a JSON object ({e})") from e
    return records


def json_record(step: int, scalars: Mapping[str, float]) -> dict:
    """`{"step": n, key: value, ...}` with non-finite values as null, their keys in `nonfinite_keys`."""
    record: dict = {"step": int(step)}
    bad = []
    for key, value in scalars.items():
        value = float(value)
        if math.isfinite(value):
            record[key] = value
        else:
            record[key] = None
            bad.append(key)
    if bad:
        record[NONFINITE_KEYS] = bad
    return record


def summary_writer(log_dir: Path):
    """tensorboardX's `SummaryWriter`, imported without torch: tensorboardX imports torch when it is
    installed, only to accept torch tensors (we log floats), and that is 3 of a run's start-up's
    CPU seconds. A later `import torch` elsewhere works as usual."""
    if "tensorboardX" not in sys.modules and "torch" not in sys.modules:
        sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` raises ImportError
        try:
            import tensorboardX  # noqa: F401
        finally:
            del sys.modules["torch"]
    from tensorboardX import SummaryWriter

    return SummaryWriter(str(log_dir))


class MetricsWriter:
    """Appends `{"step": n, ...}` lines and TensorBoard scalars; a no-op off process 0.

    On resume (`resume_step` given) records past that step, written before an interruption, are
    dropped so the file holds each step once.
    """

    def __init__(self, out_dir: str | Path, resume_step: int | None = None):
        self.enabled = jax.process_index() == 0
        self.path = Path(out_dir) / METRICS_FILE
        self._file = self._tb = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = [
                r for r in read_metrics(self.path) if resume_step is not None and r["step"] <= resume_step
            ]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)
        self._file = open(self.path, "a")
        self._tb = summary_writer(Path(out_dir) / "tensorboard")

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(json_record(step, scalars), allow_nan=False) + "\n")
        self._file.flush()
        for name, value in scalars.items():
            self._tb.add_scalar(name, float(value), int(step))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._tb.close()
            self._file = self._tb = None


def plot_losses(
    runs: Sequence[tuple[str, str | Path]],
    out_png: str | Path,
    key: str = "loss",
    keys: Sequence[str] | None = None,
) -> Path:
    """One PNG with a panel per `(label, metrics.jsonl)`: `key` (or that run's entry of `keys`) against
    step; a run without that key gets an empty panel saying so. Written via a temp file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(keys) if keys is not None else [key] * len(runs)
    fig, axes = plt.subplots(1, len(runs), figsize=(4.5 * len(runs), 3.5), squeeze=False)
    for ax, (label, path), name in zip(axes[0], runs, keys, strict=True):
        records = [r for r in read_metrics(path) if r.get(name) is not None]
        if records:
            ax.plot([r["step"] for r in records], [r[name] for r in records], lw=1.5)
        else:
            ax.text(
                0.5,
                0.5,
                f"no {name!r} in {Path(path).name}",
                ha="center",
                va="center",
                transform=ax.transAxes,
            )
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out_png = Path(out_png)
    tmp = out_png.with_name(out_png.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out_png)
    return out_png

"""Start-up cost: the entry points that need no model or input pipeline (LLM client and judge,
curation, records, the multi-process launcher) import neither jax nor grain, the lazily imported
public names of `pathor1_jax.data` all resolve, and writing metrics (TensorBoard too) imports no
torch."""

from __future__ import annotations

import subprocess
import sys

LIGHT = (
    "pathor1_jax.cli",
    "pathor1_jax.data.llm",
    "pathor1_jax.data.jsonl",
    "pathor1_jax.eval.judge",
    "pathor1_jax.curation.generate",
    "pathor1_jax.launch.local",
)
CODE = f"""
import importlib, sys
for name in {LIGHT!r}:
    importlib.import_module(name)
print(sorted({{"jax", "grain", "tensorflow_datasets", "orbax"}} & set(sys.modules)))
import pathor1_jax.data as data
missing = [name for name in data.__all__ if getattr(data, name, None) is None]
print(missing, "jax" in sys.modules)
import glob, tempfile
from pathor1_jax.train.metrics import MetricsWriter
out = tempfile.mkdtemp()
writer = MetricsWriter(out)
writer.write(1, {{"loss": 1.0}})
writer.close()
print(len(glob.glob(out + "/tensorboard/events.out.tfevents.*")), "torch" in sys.modules)
"""


def test_light_entry_points_import_no_jax_and_the_data_names_resolve_and_metrics_need_no_torch():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == ["[]", "[] True", "1 False"], out.stdout + out.stderr

"""Start-up cost: the entry points that need no model or input pipeline (LLM client and judge,
curation, records, the multi-process launcher) import neither jax nor grain, and the lazily
imported public names of `pathor1_jax.data` all resolve."""

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
"""


def test_light_entry_points_import_no_jax_and_the_data_names_resolve():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == ["[]", "[] True"], out.stdout + out.stderr

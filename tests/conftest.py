"""Shared pytest set-up: float32 matmuls at full precision so parity tests mean something; XLA's
cheapest CPU code generation; tests marked `libtpu` are skipped where libtpu (the `jax[tpu]` extra)
is not installed."""

import importlib.util
import os

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")
# LLVM's optimisations off for every CPU compile of the suite, in pytest and in the processes tests
# start (they inherit XLA_FLAGS; read when jax makes its first client, after this). Compiling tiny
# models' programs is most of the suite's CPU time and takes ~35% less (tests/test_scan_layers.py
# 80 -> 50 CPU-s); the programs compute the same values within float noise, no test here measures
# speed (bench/ does, without these flags), and libtpu's TPU compiles ignore them (same executable).
FAST_CPU_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_CPU_COMPILE}".strip()
# Other processes on this host (parallel test runs, other compiles) may hold libtpu's lock file.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def pytest_collection_modifyitems(config, items):
    if importlib.util.find_spec("libtpu") is not None:
        return
    skip = pytest.mark.skip(reason="libtpu is not installed (pip install 'jax[tpu]')")
    for item in items:
        if "libtpu" in item.keywords:
            item.add_marker(skip)

"""Shared pytest set-up: float32 matmuls at full precision so parity tests mean something; XLA's
cheapest CPU code generation; tests marked `libtpu` are skipped where libtpu (the `jax[tpu]` extra)
is not installed, tests marked `gpu` unless JAX's backend is a GPU; the shipped configs' TPU
compiles start at collection, beside the rest of the suite."""

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


SHIPPED_FIT = "test_shipped_config_fits_its_slice"  # tests/test_shipped_configs_fit.py


def pytest_collection_modifyitems(config, items):
    # the shipped configs' TPU compiles last: they start in the background at collection (below)
    items.sort(key=lambda item: getattr(item, "originalname", None) == SHIPPED_FIT)
    if importlib.util.find_spec("libtpu") is not None:
        return
    skip = pytest.mark.skip(reason="libtpu is not installed (pip install 'jax[tpu]')")
    for item in items:
        if "libtpu" in item.keywords:
            item.add_marker(skip)


def pytest_runtest_setup(item):
    # asked at set-up, not at collection: collecting must not start JAX's backends
    if "gpu" in item.keywords and jax.default_backend() != "gpu":
        pytest.skip(f"needs a GPU (JAX's default backend is {jax.default_backend()!r})")


def pytest_collection_finish(session):
    """The selected shipped-config TPU compiles (minutes each, mostly one core: `fit_cells`) start now,
    one at a time at nice 19, on the core the rest of the suite leaves idle (most tests compile
    tiny programs on one core) without taking CPU from it; their tests, sorted last, then wait for
    them with two processes at a time."""
    items = [item for item in session.items if getattr(item, "originalname", None) == SHIPPED_FIT]
    if not items or session.config.option.collectonly or importlib.util.find_spec("libtpu") is None:
        return
    from fit_cells import start

    cells = items[0].module.CELLS
    configs = [item.callspec.params["config"] for item in items]
    start([(config, cells[config][0]) for config in configs], workers=1, nice=19)

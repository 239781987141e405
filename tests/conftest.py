"""Shared pytest set-up: float32 matmuls at full precision so parity tests mean something; tests
marked `libtpu` are skipped where libtpu (the `jax[tpu]` extra) is not installed."""

import importlib.util
import os

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")
# Other processes on this host (parallel test runs, other compiles) may hold libtpu's lock file.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def pytest_collection_modifyitems(config, items):
    if importlib.util.find_spec("libtpu") is not None:
        return
    skip = pytest.mark.skip(reason="libtpu is not installed (pip install 'jax[tpu]')")
    for item in items:
        if "libtpu" in item.keywords:
            item.add_marker(skip)

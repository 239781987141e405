"""Shared pytest set-up: float32 matmuls at full precision so parity tests mean something."""

import jax

jax.config.update("jax_default_matmul_precision", "highest")

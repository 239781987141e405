"""pathor1_jax: Patho-R1 (pathology vision-language reasoning) in JAX."""

__version__ = "0.1.0"

"""Subcommands of the `pathor1` command line (see pathor1_jax.cli)."""

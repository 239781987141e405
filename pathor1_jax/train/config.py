"""Config files and command-line overrides, as in big_vision.

    pathor1 train --config configs/sft_3b.py --config.optim.lr=1e-5 --config.train.steps=100

A config file is a Python file defining `get_config(arg: str | None = None) -> ConfigDict`;
`--config configs/x.py:arg` passes `arg`. Each `--config.a.b=value` override must name a key that
the file defines: an unknown key is an error naming it and the keys that do exist there. Values
are parsed to the type of the value they replace (`True`/`false`/`1` for booleans, Python literals
for tuples and lists, `None` only where the default is None).
"""

from __future__ import annotations

import ast
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import ml_collections

from pathor1_jax.errors import ConfigError

__all__ = ["ConfigError", "apply_override", "load_config", "load_config_file", "parse_overrides"]

OVERRIDE_PREFIX = "--config."


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """`path.py` or `path.py:arg` → the `ConfigDict` its `get_config` returns."""
    path, _, arg = spec.partition(":")
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {path}: no such file")
    module_spec = importlib.util.spec_from_file_location(f"pathor1_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigError(f"config file {path}:{e.lineno}: syntax error: {e.msg}") from e
    except Exception as e:  # the file is user code: report, with --debug its traceback
        raise ConfigError(f"config file {path}: {type(e).__name__}: {e}") from e
    get_config = getattr(module, "get_config", None)
    if get_config is None:
        raise ConfigError(f"config file {path}: defines no get_config()")
    try:
        config = get_config(arg) if arg else get_config()
    except Exception as e:
        what = f"get_config({arg!r})" if arg else "get_config()"
        raise ConfigError(f"config file {path}: {what} failed: {type(e).__name__}: {e}") from e
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(
            f"config file {path}: get_config() returned {type(config).__name__}, not ConfigDict"
        )
    return config


def _parse_value(key: str, text: str, current):
    """`text` as the type of `current` (the value being overridden)."""
    if isinstance(current, bool):
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"--config.{key}={text}: expected a boolean (true/false)")
    if isinstance(current, str):
        return text
    if current is None:
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError) as e:
        raise ConfigError(f"--config.{key}={text}: not a {type(current).__name__} literal") from e
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    if isinstance(current, (tuple, list)) and not isinstance(value, (tuple, list)):
        value = type(current)([value])
    if not isinstance(value, type(current)):
        raise ConfigError(
            f"--config.{key}={text}: expected {type(current).__name__} like the default {current!r}, "
            f"got {type(value).__name__}"
        )
    return value


def apply_override(config: ml_collections.ConfigDict, key: str, text: str) -> None:
    """Set `config.<key>` (dotted) from the string `text`; an unknown key raises `ConfigError`."""
    node = config
    parts = key.split(".")
    for i, part in enumerate(parts):
        known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        if part not in known:
            where = ".".join(parts[:i]) or "the top level"
            raise ConfigError(
                f"unknown config key {key!r}: {part!r} is not a key of {where} (known: {', '.join(known)})"
            )
        if i == len(parts) - 1:
            current = node[part]
            if isinstance(current, ml_collections.ConfigDict):
                raise ConfigError(f"--config.{key}: is a block of keys, override one of its keys instead")
            with node.unlocked():
                node[part] = _parse_value(key, text, current)
        else:
            node = node[part]


def parse_overrides(argv: Sequence[str]) -> list[tuple[str, str]]:
    """`["--config.a.b=1", "--config.c", "2"]` → `[("a.b", "1"), ("c", "2")]`."""
    out, i = [], 0
    argv = list(argv)
    while i < len(argv):
        item = argv[i]
        if not item.startswith(OVERRIDE_PREFIX):
            raise ConfigError(f"unexpected argument {item!r}: overrides look like --config.key=value")
        body = item[len(OVERRIDE_PREFIX) :]
        if "=" in body:
            key, value = body.split("=", 1)
        elif i + 1 < len(argv):
            key, value = body, argv[i + 1]
            i += 1
        else:
            raise ConfigError(f"{item}: missing a value")
        out.append((key, value))
        i += 1
    return out


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Load `spec` (`file.py[:arg]`), apply `--config.key=value` overrides, and lock it."""
    config = load_config_file(spec)
    for key, value in parse_overrides(overrides):
        apply_override(config, key, value)
    config.lock()
    return config

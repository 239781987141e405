"""The `pathor1` command line: one subcommand per module in `pathor1_jax.commands`.

Each command module defines `add_arguments(parser)` and `run(args) -> int`; modules are imported
only when their command runs, so `pathor1 --help` stays fast. A module with `TAKES_OVERRIDES = True`
receives the arguments its parser does not know (`--config.key=value`) as `args.overrides`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("pathor1_jax.commands.generate", "generate text from an image and a prompt"),
    "shardings": ("pathor1_jax.commands.shardings", "show each parameter's sharding and memory per device"),
    "train": ("pathor1_jax.commands.train", "train one stage (CPT, SFT) from a config file"),
    "eval": ("pathor1_jax.commands.eval", "evaluate: MCQ accuracy, CLIP zero-shot / retrieval / few-shot"),
    "demo": ("pathor1_jax.commands.demo", "the end-to-end demo on the embedded data (CPU, minutes)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="pathor1", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.parse_args(argv)
        return 2
    name = argv[0]
    module = importlib.import_module(COMMANDS[name][0])
    cmd_parser = argparse.ArgumentParser(prog=f"pathor1 {name}", description=COMMANDS[name][1])
    module.add_arguments(cmd_parser)
    if getattr(module, "TAKES_OVERRIDES", False):
        args, overrides = cmd_parser.parse_known_args(argv[1:])
        args.overrides = overrides
    else:
        args = cmd_parser.parse_args(argv[1:])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""The `pathor1` command line: one subcommand per module in `pathor1_jax.commands`.

Each command module defines `add_arguments(parser)` and `run(args) -> int`; modules are imported
only when their command runs, so `pathor1 --help` stays fast. A module with `TAKES_OVERRIDES = True`
receives the arguments its parser does not know (`--config.key=value`) as `args.overrides`.

Errors are reported here, once for every command (see `pathor1_jax.errors`): a `UserError` (bad
config, flag, record or file; also any `OSError`) prints `pathor1 <command>: error: <message>` and
exits 2, a `Pathor1Error` exits 1 the same way; `--debug` (anywhere on the line) adds the traceback.
Ctrl-C exits 130; a preempted training run exits 143 (see `errors.EXIT_PREEMPTED`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from pathor1_jax.errors import EXIT_INTERRUPTED, EXIT_USAGE, Pathor1Error

COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("pathor1_jax.commands.generate", "generate text from an image and a prompt"),
    "shardings": ("pathor1_jax.commands.shardings", "show each parameter's sharding and memory per device"),
    "compile": ("pathor1_jax.commands.compile", "compile a config's step for a TPU slice (no TPU needed)"),
    "train": ("pathor1_jax.commands.train", "train one stage (cpt, sft, grpo, dapo, clip) from a config"),
    "eval": ("pathor1_jax.commands.eval", "evaluate: MCQ accuracy, CLIP zero-shot / retrieval / few-shot"),
    "curate": ("pathor1_jax.commands.curate", "data curation: PDFs -> pairs -> subfields, CoT, QC, RL MCQs"),
    "serve": ("pathor1_jax.commands.serve", "serve a model over an OpenAI-compatible HTTP API"),
    "demo": ("pathor1_jax.commands.demo", "the end-to-end demo on the embedded data (CPU, minutes)"),
}

DEBUG_HELP = "--debug (anywhere on the line) shows the traceback of an error."


def split_debug(argv: list[str]) -> tuple[list[str], bool]:
    """`argv` without its `--debug` flags (before a bare `--`), and whether there was one; the
    environment variable PATHOR1_DEBUG=1 turns it on too."""
    end = argv.index("--") if "--" in argv else len(argv)
    kept = [a for a in argv[:end] if a != "--debug"] + argv[end:]
    return kept, len(kept) != len(argv) or os.environ.get("PATHOR1_DEBUG", "") not in ("", "0")


def report(command: str, error: BaseException, debug: bool) -> None:
    """`pathor1 <command>: error: <message>` on stderr, after the traceback with `--debug`."""
    if debug:
        traceback.print_exception(error)
    message = str(error) or type(error).__name__
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        message = f"{error.filename}: {error.strerror}"
    print(f"pathor1 {command}: error: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv, debug = split_debug(sys.argv[1:] if argv is None else list(argv))
    parser = argparse.ArgumentParser(
        prog="pathor1",
        description=__doc__.splitlines()[0],
        epilog=DEBUG_HELP,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.parse_args(argv)
        return EXIT_USAGE
    name = argv[0]
    module = importlib.import_module(COMMANDS[name][0])
    cmd_parser = argparse.ArgumentParser(prog=f"pathor1 {name}", description=COMMANDS[name][1])
    module.add_arguments(cmd_parser)
    cmd_parser.epilog = " ".join(filter(None, [cmd_parser.epilog, DEBUG_HELP]))
    if getattr(module, "TAKES_OVERRIDES", False):
        args, overrides = cmd_parser.parse_known_args(argv[1:])
        args.overrides = overrides
    else:
        args = cmd_parser.parse_args(argv[1:])
    args.debug = debug
    try:
        return int(module.run(args) or 0)
    except Pathor1Error as e:
        report(name, e, debug)
        if getattr(e, "exit_now", False):  # e.g. a lost peer process: skip the clean-up at exit
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(e.exit_code)
        return e.exit_code
    except OSError as e:  # a file that cannot be read or written, a full disk: the user's to fix
        report(name, e, debug)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"pathor1 {name}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())

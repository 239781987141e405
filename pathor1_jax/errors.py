"""The errors that `pathor1` reports as one line, and its exit codes.

Library code raises `UserError` (or a subclass) for bad input — a config key or value, a flag, a
record, a file, a run directory that belongs to another run — and `Pathor1Error` for a run that
stops itself for a reason it can state (a diverging loss, no intact checkpoint left). The command
line (`pathor1_jax.cli`) catches them once, for every command, prints

    pathor1 <command>: error: <message>

and exits with the error's `exit_code`; `--debug` prints the traceback too. Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1  # a run stopped itself (Pathor1Error), or a bug (traceback)
EXIT_USAGE = 2  # bad input (UserError), as argparse exits for a bad flag
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
EXIT_PREEMPTED = 143  # SIGTERM (128 + SIGTERM): a checkpoint was saved; rerun the command to resume


class Pathor1Error(Exception):
    """An anticipated failure whose message says what happened and what to do; no traceback."""

    exit_code = EXIT_FAILURE


class UserError(Pathor1Error, ValueError):
    """Bad input: config, flags, records, files, run directory. The message names the culprit.
    (A ValueError too: what library code raised for bad input before.)"""

    exit_code = EXIT_USAGE


class ConfigError(UserError):
    """A config file, key or value that cannot be used; the message names the key or file."""

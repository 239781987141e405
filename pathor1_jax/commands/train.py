"""`pathor1 train --config configs/sft_3b.py [--workdir DIR] [--config.key=value ...]`: one training run
of the stage `config.stage` names (an entry of `pathor1_jax.stages.STAGES`: cpt, sft, grpo, dapo, clip).

Overrides address any key of the config (`--config.optim.lr=1e-5`, `--config.train.steps 100`); a key
the config does not define is an error naming it. Rerunning the same command on the same work
directory resumes from its latest checkpoint (exactly: weights, optimizer, step, RNG, data order).
A run stopped by SIGTERM (preemption) saves a checkpoint and exits 143 (`errors.EXIT_PREEMPTED`):
rerun the same command to resume.
"""

from __future__ import annotations

import argparse

from pathor1_jax.errors import EXIT_OK, EXIT_PREEMPTED
from pathor1_jax.train.config import load_config

TAKES_OVERRIDES = True  # the --config.<key>=<value> arguments, see pathor1_jax.cli


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="config file defining get_config() (path.py[:arg])")
    parser.add_argument("--workdir", help="run directory (default: the config's train.out_dir)")
    parser.epilog = "Any --config.<key>=<value> overrides that key of the config."


def run(args: argparse.Namespace) -> int:
    from pathor1_jax.sharding.multihost import is_main_process, maybe_initialize_distributed

    maybe_initialize_distributed()
    config = load_config(args.config, args.overrides)
    from pathor1_jax import stages

    result = stages.run(config, args.workdir)
    if is_main_process():
        state = "preempted (SIGTERM); rerun the same command to resume" if result.preempted else "done"
        print(
            f"{config.stage}: steps {result.start_step}->{result.end_step}, {result.metric} "
            f"{result.first} -> {result.last}; {state}; run directory {result.out_dir}"
        )
    return EXIT_PREEMPTED if result.preempted else EXIT_OK

"""`pathor1 train` for each config given (`--config ... [overrides] ; --config ...`) in one process, with
rewards a random policy earns half the time (accuracy: an even text length; format: always), so that
the multi-process RL tests update on real advantages and DAPO's filter keeps and drops groups."""

import sys

from pathor1_jax.cli import main
from pathor1_jax.rl import rewards

rewards.accuracy_reward = lambda text, answer: float(len(text) % 2 == 0)
rewards.format_reward = lambda text: 1.0

if __name__ == "__main__":
    args = sys.argv[1:]
    runs, start = [], 0
    for i, arg in enumerate([*args, ";"]):
        if arg == ";":
            runs.append(args[start:i])
            start = i + 1
    for run in runs:
        if code := main(["train", *run]):
            sys.exit(code)

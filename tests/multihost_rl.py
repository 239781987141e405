"""`pathor1 train ARGS` in one process, with rewards a random policy earns half the time (accuracy: an
even text length; format: always), so that the multi-process RL test updates on real advantages."""

import sys

from pathor1_jax.cli import main
from pathor1_jax.rl import rewards

rewards.accuracy_reward = lambda text, answer: float(len(text) % 2 == 0)
rewards.format_reward = lambda text: 1.0

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))

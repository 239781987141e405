"""The global batch as a fixed number of data shards, whatever the number of processes feeding it.

`config.data.shards = S` (0: one shard per process, fixed when the run first starts). Shard `s` is
its own input pipeline over records `s::S` and gives `data.batch_size` rows (and up to
`max_patches` image patches) per micro-batch; the global micro-batch is the S shards in order.
The processes split the batch into blocks of consecutive rows (`multihost.batch_block`, one per
process on the usual meshes); block `i` of `B` reads shards `[i·S/B, (i+1)·S/B)`. So what a run
trains on — and so its losses — does not depend on the process layout, and the data position
saved in a checkpoint (every shard's iterator state, gathered from all processes into one JSON)
resumes on any number of processes that divides S. With `data.shards = 0` a resumed run takes
the checkpoint's S; on a process count that does not divide it the run stops with an error
naming the counts that do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from pathor1_jax.errors import UserError
from pathor1_jax.sharding.multihost import gather_objects

# (shard index, shard count) -> that shard's checkpointable iterator of host micro-batches
ShardFactory = Callable[[int, int], Iterator[dict]]


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


class ShardedData:
    """This process's shards of the global batch: `next()` gives `[(shard_index, micro_batch), ...]`
    in shard order; `get_state()` (a collective: every process calls it) is the whole batch's
    position, `set_state()` restores this process's shards from it."""

    def __init__(self, make_shard: ShardFactory, num_shards: int, block: tuple[int, int]):
        """num_shards: `config.data.shards` (0 = one per block); block: `(index, count)` of this
        process's rows of the batch (`multihost.batch_block`)."""
        if num_shards < 0:
            raise UserError(f"config.data.shards={num_shards} must be >= 0 (0: one per process)")
        self.make_shard = make_shard
        self.block = block
        self.configured = num_shards
        self._build(num_shards or block[1])

    def _build(self, num_shards: int) -> None:
        index, count = self.block
        if num_shards % count:
            raise UserError(
                f"{num_shards} data shards do not split over the {count} processes feeding the batch: "
                f"run on a number of processes in {divisors(num_shards)}, or start a new run"
            )
        per = num_shards // count
        self.num_shards = num_shards
        self.shards = list(range(index * per, (index + 1) * per))
        self.iterators = [self.make_shard(s, num_shards) for s in self.shards]

    def __iter__(self) -> ShardedData:
        return self

    def __next__(self) -> list[tuple[int, dict]]:
        return [(s, next(it)) for s, it in zip(self.shards, self.iterators, strict=True)]

    def drop_counts(self) -> dict[str, int]:
        """Records this process's shards left out so far, by kind (see `pipeline.SkipDropped`)."""
        total: dict[str, int] = {}
        for it in self.iterators:
            for kind, n in (it.drop_counts() if hasattr(it, "drop_counts") else {}).items():
                total[kind] = total.get(kind, 0) + n
        return total

    def local_state(self) -> dict:
        """This process's shards' positions (no communication)."""
        return {"shards": self.shards, "states": [it.get_state() for it in self.iterators]}

    def gather_state(self, local: dict) -> dict:
        """Every process's `local_state()` merged into the whole batch's position (a collective)."""
        states: dict[int, Any] = {}
        for part in gather_objects(local):
            states.update(zip(part["shards"], part["states"], strict=True))
        return {"num_shards": self.num_shards, "shards": [states[s] for s in range(self.num_shards)]}

    def get_state(self) -> dict:
        return self.gather_state(self.local_state())

    def set_state(self, state: dict) -> None:
        if "num_shards" not in state:  # written before data shards: one process, one iterator
            state = {"num_shards": 1, "shards": [state]}
        saved = int(state["num_shards"])
        if saved != self.num_shards:
            if self.configured:
                raise UserError(
                    f"the checkpoint's data position has {saved} shards but config.data.shards="
                    f"{self.configured}: set data.shards={saved} (or 0) to resume this run"
                )
            self._build(saved)
        for s, it in zip(self.shards, self.iterators, strict=True):
            it.set_state(state["shards"][s])

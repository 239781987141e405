"""Data shards: which shards a process reads for its block of rows, and positions that move between
process layouts (the multi-process runs themselves are in test_multihost.py)."""

from __future__ import annotations

import pytest

from pathor1_jax.train.data_shards import ShardedData


class Counter:
    """Shard `index` of `count`: yields `(index, position)`, resumable."""

    def __init__(self, index: int, count: int):
        self.index, self.count, self.position = index, count, 0

    def __next__(self):
        self.position += 1
        return {"shard": self.index, "of": self.count, "position": self.position}

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = state["position"]


def test_each_block_reads_its_consecutive_shards():
    assert ShardedData(Counter, 4, (0, 1)).shards == [0, 1, 2, 3]
    assert ShardedData(Counter, 4, (1, 2)).shards == [2, 3]
    assert ShardedData(Counter, 0, (2, 3)).shards == [2]  # 0: one shard per block
    first = next(ShardedData(Counter, 4, (1, 2)))
    assert [(s, b["shard"], b["of"]) for s, b in first] == [(2, 2, 4), (3, 3, 4)]


def test_positions_saved_by_two_processes_resume_on_one_and_the_other_way():
    two = [ShardedData(Counter, 4, (i, 2)) for i in range(2)]
    for data in two:
        for _ in range(3):
            next(data)
    next(two[1])  # process 1's shards are one batch further (as if it had not stopped yet)
    saved = {"num_shards": 4, "shards": [*two[0].local_state()["states"], *two[1].local_state()["states"]]}
    one = ShardedData(Counter, 0, (0, 1))  # data.shards = 0: takes the checkpoint's 4
    one.set_state(saved)
    assert one.num_shards == 4 and one.shards == [0, 1, 2, 3]
    assert [b["position"] for _, b in next(one)] == [4, 4, 5, 5]
    assert one.get_state() == {"num_shards": 4, "shards": [{"position": p} for p in (4, 4, 5, 5)]}
    back = ShardedData(Counter, 4, (1, 2))
    back.set_state(one.get_state())
    assert [b["position"] for _, b in next(back)] == [6, 6]


def test_layouts_that_cannot_honour_the_shards_are_errors():
    with pytest.raises(ValueError, match=r"4 data shards do not split over the 3 processes .* \[1, 2, 4\]"):
        ShardedData(Counter, 0, (0, 3)).set_state({"num_shards": 4, "shards": [{"position": 0}] * 4})
    with pytest.raises(ValueError, match=r"checkpoint's data position has 4 shards but config.data.shards=2"):
        ShardedData(Counter, 2, (0, 1)).set_state({"num_shards": 4, "shards": [{"position": 0}] * 4})
    with pytest.raises(ValueError, match="6 data shards do not split over the 4 processes"):
        ShardedData(Counter, 6, (0, 4))
    legacy = ShardedData(Counter, 0, (0, 1))  # a checkpoint from before data shards
    legacy.set_state({"position": 7})
    assert next(legacy)[0][1]["position"] == 8

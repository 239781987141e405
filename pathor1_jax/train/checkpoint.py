"""Run checkpoints with orbax: the train state (params, optimizer, step, RNG) and the data iterator.

`<run>/checkpoints/<step>/` holds two items: `state` (the train-state pytree, `StandardSave`) and
`data` (the iterator's state as JSON). Saves are asynchronous and the last `keep` are kept. Orbax
writes each step into a temporary folder and renames it when complete, so a crash mid-save leaves
the previous step as the latest loadable one (`latest_step` never returns a partial save).
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

STATE, DATA = "state", "data"
_BYTES = "__bytes_b64__"


def _to_json(data_state: Any) -> Any:
    if isinstance(data_state, bytes):
        return {_BYTES: base64.b64encode(data_state).decode("ascii")}
    return data_state


def _from_json(data_state: Any) -> Any:
    if isinstance(data_state, dict) and set(data_state) == {_BYTES}:
        return base64.b64decode(data_state[_BYTES])
    return data_state


def abstract_like(tree: Any) -> Any:
    """Shape/dtype/sharding placeholders of `tree` (what restore fills in, laid out the same)."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpointer:
    """Async keep-N checkpoints of `(train_state, data_state)` under `directory`."""

    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=(STATE, DATA))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: dict, data_state: Any = None) -> None:
        """Start saving step `step` (returns before the write completes when async)."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                **{STATE: ocp.args.StandardSave(state), DATA: ocp.args.JsonSave(_to_json(data_state))}
            ),
            force=True,
        )

    def restore(self, step: int, like: dict) -> tuple[dict, Any]:
        """`(state, data_state)` of `step`, laid out like the abstract or concrete tree `like`."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                **{STATE: ocp.args.StandardRestore(abstract_like(like)), DATA: ocp.args.JsonRestore()}
            ),
        )
        return restored[STATE], _from_json(restored[DATA])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def restore_params(directory: str | Path, like_params: dict, step: int | None = None) -> dict:
    """Only the parameters of a run's checkpoint (latest step unless given), laid out like
    `like_params`: how a stage starts from the previous stage's result (whose optimizer state,
    e.g. with other parameters frozen, need not match this stage's)."""
    directory = Path(directory).absolute()
    manager = ocp.CheckpointManager(directory, item_names=(STATE, DATA))
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint under {directory}")
        like = {"params": abstract_like(like_params)}
        restore_args = jax.tree.map(
            lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype), like
        )
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                **{STATE: ocp.args.PyTreeRestore(like, restore_args=restore_args, partial_restore=True)}
            ),
        )
        return restored[STATE]["params"]
    finally:
        manager.close()

"""Orbax checkpoints of a run: train state (params, optimizer state, step) plus JSON metadata.

The metadata holds everything else a resumed run needs to continue exactly (the RNG seed, the data
position, the evaluation history). Saving goes through orbax's CheckpointManager, which writes each
checkpoint to a temporary name and renames it when complete, so an interrupted save never damages an
earlier checkpoint; the manager keeps the last `keep`.
"""
from __future__ import annotations

from typing import Any

import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str, *, keep: int):
        # Synchronous saves: a run saving on SIGTERM must have the checkpoint on disk before it exits.
        self.manager = ocp.CheckpointManager(
            directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                            enable_async_checkpointing=False))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict[str, Any]) -> None:
        if step in self.manager.all_steps():
            return
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)))
        self.manager.wait_until_finished()

    def restore(self, step: int, abstract_state) -> tuple[Any, dict[str, Any]]:
        """The state at `step`, placed with the shardings of `abstract_state`, and its metadata."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return restored.state, restored.meta

    def close(self) -> None:
        self.manager.close()

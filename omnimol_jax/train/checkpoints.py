"""Run checkpoints: Orbax CheckpointManager over the train state, the Grain iterator state and the config.

Frozen weights never change during a run, so they are written once (`<output_dir>/frozen`, the model
checkpoint format) instead of at every step. Orbax finalises a step atomically, so an interrupted save never
appears as a step; a finalised step that fails to restore (corrupt files) is reported and the previous one is
used instead.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Optional

import grain
import jax
import orbax.checkpoint as ocp

logger = logging.getLogger(__name__)


class RunCheckpoints:
    def __init__(self, directory: Path, keep: int, async_save: bool):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                 create=True),
            item_names=("state", "data", "config"))

    def save(self, step: int, state: Any, data_iterator: Any, config: dict, force: bool = False) -> bool:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=grain.checkpoint.CheckpointSave(data_iterator),
                                  config=ocp.args.JsonSave(config))
        return self.manager.save(step, args=args, force=force)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore_latest(self, abstract_state: Any, data_iterator: Any,
                       warn: Callable[[str], None] = logger.warning) -> Optional[tuple[int, Any]]:
        """(step, state) of the newest step that restores; corrupt newer steps are reported and skipped.

        Returns None when there is no checkpoint. If checkpoints exist but none restores, raises.
        """
        steps = self.steps()
        errors = []
        for step in reversed(steps):
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=grain.checkpoint.CheckpointRestore(data_iterator)))
            except Exception as err:  # noqa: BLE001 - any failure to read a step means: try the previous one
                errors.append(f"step {step}: {type(err).__name__}: {err}")
                warn(f"checkpoint step {step} in {self.directory} cannot be restored ({type(err).__name__}: "
                     f"{str(err)[:300]}); falling back to the previous checkpoint")
                continue
            return step, restored["state"]
        if steps:
            raise RuntimeError(f"no checkpoint in {self.directory} could be restored:\n  " + "\n  ".join(errors))
        return None


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) for a concrete pytree, as a restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)

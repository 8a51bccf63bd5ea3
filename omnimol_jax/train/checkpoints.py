"""Run checkpoints: Orbax CheckpointManager over the train state, the Grain iterator state and the config.

Frozen weights never change during a run, so they are written once (`<output_dir>/frozen`, the model
checkpoint format) instead of at every step. Orbax finalises a step atomically, so an interrupted save never
appears as a step (its temporary folder is removed when the manager next starts); a finalised step that fails to
restore (corrupt files) is reported and the previous one is used instead. Saving a step that already exists is a
no-op, so a rerun after the last checkpoint goes straight on to validation and export. A save that fails (disk
full, permissions) raises CheckpointSaveError naming the path and the newest intact step.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Callable, Optional

import grain
import jax
import orbax.checkpoint as ocp

from omnimol_jax.errors import RunError, one_line, storage_error_message

logger = logging.getLogger(__name__)


class CheckpointSaveError(RunError):
    """A run checkpoint could not be written; the message names the path and the newest intact step."""


class NoRestorableCheckpointError(RunError):
    """Checkpoints exist but none restores."""


class RunCheckpoints:
    def __init__(self, directory: Path, keep: int, async_save: bool):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                 create=True, cleanup_tmp_directories=True),
            item_names=("state", "data", "config"))

    def save(self, step: int, state: Any, data_iterator: Any, config: dict, force: bool = False) -> bool:
        """Saves `step` (asynchronously if configured); False when not saved, e.g. because it already exists."""
        if step in self.manager.all_steps():
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=grain.checkpoint.CheckpointSave(data_iterator),
                                  config=ocp.args.JsonSave(config))
        with self._save_errors(step):
            return self.manager.save(step, args=args, force=force)

    def wait(self) -> None:
        with self._save_errors(None):
            self.manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()

    @contextlib.contextmanager
    def _save_errors(self, step: Optional[int]):
        try:
            yield
        except Exception as err:  # noqa: BLE001 - Orbax wraps OS errors in its own types (and async ones late)
            cause = storage_error_message(err) or one_line(f"{type(err).__name__}: {err}", 300)
            intact = [s for s in self._finalised_steps() if s != step]
            kept = (f"the previous checkpoint (step {intact[-1]}) is intact" if intact
                    else "no earlier checkpoint exists")
            raise CheckpointSaveError(f"saving the checkpoint{f' of step {step}' if step is not None else ''} "
                                      f"in {self.directory} failed: {cause}; {kept}") from err

    def _finalised_steps(self) -> list[int]:
        try:
            return sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit())
        except OSError:
            return []

    def latest_config(self) -> Optional[tuple[int, dict]]:
        """(step, config dict) stored with the newest step whose config reads; None without checkpoints."""
        for step in reversed(self.steps()):
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
            except Exception:  # noqa: BLE001 - a corrupt step: the next older one may do
                continue
            return step, dict(restored["config"])
        return None

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
            raise NoRestorableCheckpointError(
                f"no checkpoint in {self.directory} could be restored ({'; '.join(e[:200] for e in errors)}); move "
                "the directory away to start afresh")
        return None


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) for a concrete pytree, as a restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)

"""The run config as a contract: every run checkpoint stores the config it was written with, and a resume compares
the new config with it before anything is built.

Three kinds of key:
    bookkeeping   may change on resume and is applied (logged): how long to train, how often to log, validate and
                  save, the mesh (checkpoints restore onto any mesh), profiling, export, and how the step is
                  computed (remat, scanned layers, attention and MoGE kernels, loss chunking: the same numbers
                  within fp32 rounding, as the tests check, and the same train state);
    ignored       init.*: weights come from the run's own checkpoints on resume, so a new value has no effect
                  (logged as a warning);
    contract      everything else: shapes of the train state, the data stream, the optimisation recipe. A change
                  stops the resume with the key diff, unless listed in train.allow_config_change.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

from omnimol_jax.errors import InputError

BOOKKEEPING_KEYS = (
    "run_name", "mesh", "train.output_dir", "train.max_steps", "train.log_every", "train.eval_every",
    "train.eval_batches", "train.checkpoint_every", "train.keep_checkpoints", "train.async_checkpointing",
    "train.max_consecutive_nonfinite", "train.profile_steps", "train.peak_flops_per_device", "train.export_final",
    "train.allow_config_change", "data.prefetch_batches", "data.max_logged_examples",
    "data.max_consecutive_rejections", "data.strict", "data.allow_empty_tasks",
    "model.remat_policy", "model.scan_layers", "model.attention_impl", "model.attention_block",
    "model.splash_block_q", "model.splash_block_kv",
    "model.moge.implementation", "train.loss_chunk",
)
IGNORED_ON_RESUME_KEYS = ("init",)


class ConfigMismatchError(InputError):
    """The config differs from the one the run's checkpoints were written with, in keys that must not change."""


@dataclasses.dataclass
class ConfigChanges:
    applied: dict[str, tuple[Any, Any]]    # key -> (stored, new)
    ignored: dict[str, tuple[Any, Any]]
    refused: dict[str, tuple[Any, Any]]

    def __bool__(self) -> bool:
        return bool(self.applied or self.ignored or self.refused)


def flat_keys(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'train': {'max_steps': 3}} -> {'train.max_steps': 3}; values made JSON-plain (tuples become lists)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(flat_keys(value, dotted))
        else:
            out[dotted] = json.loads(json.dumps(value, default=str))
    return out


def _matches(key: str, patterns: Sequence[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in patterns)


def compare_configs(stored: dict, current: dict, allowed: Sequence[str] = ()) -> ConfigChanges:
    """Classifies every key whose value differs between the stored and the current config (nested dicts)."""
    old, new = flat_keys(stored), flat_keys(current)
    changes = ConfigChanges({}, {}, {})
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key, "<absent>"), new.get(key, "<absent>")
        if before == after:
            continue
        if _matches(key, BOOKKEEPING_KEYS) or _matches(key, allowed):
            changes.applied[key] = (before, after)
        elif _matches(key, IGNORED_ON_RESUME_KEYS):
            changes.ignored[key] = (before, after)
        else:
            changes.refused[key] = (before, after)
    return changes


def describe_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{key}: {json.dumps(before)} -> {json.dumps(after)}" for key, (before, after) in changes.items())


def upgrade_stored_config(stored: dict, processes: int) -> dict:
    """A stored config from before `data.global_batch_size`: its per-process `data.batch_size` becomes the global
    batch it meant, on this run's process count (a resume restores each process's data position, so the count
    cannot have changed)."""
    data = stored.get("data")
    if not isinstance(data, dict) or "batch_size" not in data or "global_batch_size" in data:
        return stored
    accum = (stored.get("train") or {}).get("grad_accum_steps", 1)
    data = {("global_batch_size" if k == "batch_size" else k): (v * processes * accum if k == "batch_size" else v)
            for k, v in data.items()}
    return dict(stored, data=data)


def check_resume(stored: dict, current: dict, allowed: Sequence[str], directory: str, step: int) -> ConfigChanges:
    """The changes to apply on resume; ConfigMismatchError (with the key diff) for changes that must not happen."""
    changes = compare_configs(stored, current, allowed)
    if changes.refused:
        keys = ",".join(changes.refused)
        raise ConfigMismatchError(
            f"{directory} holds checkpoints (newest: step {step}) written with a different config: "
            f"{describe_changes(changes.refused)}. Resume with the original values, choose another "
            f"train.output_dir, or accept the change with train.allow_config_change=[{keys}]")
    return changes

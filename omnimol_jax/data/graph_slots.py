"""Graph slots on the host: one `<image>` placeholder becomes one slot per heavy atom of the sample's graph.

The expanded sequence has its final, static length (positions simply continue by count); the slots carry
IGNORE_INDEX labels. On the device, `omnimol_jax.model.splice` fills slot k of a row with the row's k-th atom.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from omnimol_jax.constants import IGNORE_INDEX, IMAGE_TOKEN_ID


class GraphSlotError(ValueError):
    """Graph slots and atoms disagree (or the placeholder is missing / repeated); names the record."""


def _where(record_id: Optional[str]) -> str:
    return "" if record_id is None else f"record {record_id!r}: "


def count_graph_slots(token_ids: Sequence[int] | np.ndarray, image_token_id: int = IMAGE_TOKEN_ID) -> int:
    return int(np.count_nonzero(np.asarray(token_ids) == image_token_id))


def expand_image_placeholder(token_ids: Sequence[int] | np.ndarray, num_atoms: Optional[int], *,
                             labels: Optional[Sequence[int] | np.ndarray] = None,
                             image_token_id: int = IMAGE_TOKEN_ID, record_id: Optional[str] = None,
                             ) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Replaces the one placeholder by `num_atoms` slots; their labels become IGNORE_INDEX.

    num_atoms None (or 0) means a text-only sample, which must have no placeholder. Returns int32
    (token_ids, labels or None).
    """
    ids = np.asarray(token_ids, dtype=np.int32)
    if ids.ndim != 1:
        raise GraphSlotError(f"{_where(record_id)}token_ids must be 1-D, got shape {ids.shape}")
    lab = None if labels is None else np.asarray(labels, dtype=np.int32)
    if lab is not None and lab.shape != ids.shape:
        raise GraphSlotError(f"{_where(record_id)}labels {lab.shape} and token_ids {ids.shape} differ in shape")
    positions = np.flatnonzero(ids == image_token_id)
    if not num_atoms:
        if positions.size:
            raise GraphSlotError(f"{_where(record_id)}a text-only sample has {positions.size} graph placeholder(s)")
        return ids, lab
    if num_atoms < 0:
        raise GraphSlotError(f"{_where(record_id)}num_atoms must be >= 0, got {num_atoms}")
    if positions.size != 1:
        raise GraphSlotError(f"{_where(record_id)}expected exactly one graph placeholder ({image_token_id}) for a "
                             f"graph of {num_atoms} atoms, found {positions.size}")
    at = int(positions[0])
    slots = np.full((num_atoms,), image_token_id, np.int32)
    new_ids = np.concatenate([ids[:at], slots, ids[at + 1:]])
    new_labels = None
    if lab is not None:
        new_labels = np.concatenate([lab[:at], np.full((num_atoms,), IGNORE_INDEX, np.int32), lab[at + 1:]])
    return new_ids, new_labels


def check_graph_slots(token_ids: Sequence[int] | np.ndarray, num_atoms: Optional[int], *,
                      image_token_id: int = IMAGE_TOKEN_ID, record_id: Optional[str] = None) -> None:
    """Raises GraphSlotError unless an expanded sequence holds exactly `num_atoms` slots (0/None: none)."""
    found = count_graph_slots(token_ids, image_token_id)
    expected = int(num_atoms or 0)
    if found != expected:
        raise GraphSlotError(f"{_where(record_id)}{found} graph slots for a graph of {expected} atoms")

"""The multimodal splice: graph-slot tokens are replaced by the projected vectors of the sample's atoms.

Contract with the data pipeline: a prompt's single `<image>` placeholder (id IMAGE_TOKEN_ID after
tokenization) is expanded on the host into one slot per heavy atom of the sample's graph, so the token
sequence already has its final, static length and positions simply continue by count. Labels on the slots
are IGNORE_INDEX. On device, slot k of row b takes the k-th real node of row b: nodes of a row are
contiguous in the node array and in slot order (what `omnimol_jax.data.graphs.batch_graphs` produces;
for packed rows, graphs in the order of their slots). Text-only rows have no slots and stay untouched;
padding nodes (row index -1) are never read.

Host side (numpy): `expand_image_placeholder`, `check_graph_slots`, `count_graph_slots`.
Device side (jax, static shapes, no Python loop over the batch): `splice_graph_embeddings`,
`graph_slot_mismatch`, `ignore_graph_slots`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
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


# --------------------------------------------------------------------------------------------------
# Device side


def _row_node_stats(node_sample_index: jax.Array, num_rows: int) -> tuple[jax.Array, jax.Array]:
    """(number of real nodes per row [B], index of each row's first node [B]) from node_sample_index."""
    real = node_sample_index >= 0
    segment = jnp.where(real, node_sample_index, num_rows)  # padding nodes go to a discarded extra segment
    counts = jax.ops.segment_sum(real.astype(jnp.int32), segment, num_segments=num_rows + 1)[:num_rows]
    node_ids = jnp.arange(node_sample_index.shape[0], dtype=jnp.int32)
    first = jax.ops.segment_min(node_ids, segment, num_segments=num_rows + 1)[:num_rows]
    return counts, jnp.where(counts > 0, first, 0)  # empty rows: segment_min's identity is INT_MAX


def graph_slot_mismatch(input_ids: jax.Array, node_sample_index: jax.Array,
                        image_token_id: int = IMAGE_TOKEN_ID) -> jax.Array:
    """int32 [B]: graph slots minus real nodes per row (all zeros when the batch is consistent)."""
    slots = jnp.sum(input_ids == image_token_id, axis=1, dtype=jnp.int32)
    counts, _ = _row_node_stats(node_sample_index, input_ids.shape[0])
    return slots - counts


def _raise_on_mismatch(mismatch: np.ndarray) -> None:
    bad = np.flatnonzero(mismatch)
    if bad.size:
        details = ", ".join(f"row {r}: {int(mismatch[r]):+d}" for r in bad[:16])
        raise GraphSlotError(f"graph slots minus atoms per row is not zero ({details})")


def splice_graph_embeddings(token_embeddings: jax.Array, input_ids: jax.Array, node_embeddings: jax.Array,
                            node_sample_index: jax.Array, *, image_token_id: int = IMAGE_TOKEN_ID,
                            validate: bool = False) -> jax.Array:
    """[B, S, d]: token embeddings with every graph slot replaced by its atom's vector.

    token_embeddings [B, S, d]; input_ids [B, S] (slots = image_token_id); node_embeddings [N_pad, d]
    (already projected); node_sample_index int32 [N_pad] (row of each node, -1 for padding).
    validate=True adds a host callback that raises (at run time, also under jit) when a row's slot count
    differs from its atom count; otherwise a mismatch is not detected here (see graph_slot_mismatch).
    """
    batch = input_ids.shape[0]
    is_slot = input_ids == image_token_id
    slot_rank = jnp.cumsum(is_slot, axis=1, dtype=jnp.int32) - 1  # k for the k-th slot of the row
    _, first_node = _row_node_stats(node_sample_index, batch)
    node_index = jnp.clip(first_node[:, None] + slot_rank, 0, node_embeddings.shape[0] - 1)
    if validate:
        jax.debug.callback(_raise_on_mismatch, graph_slot_mismatch(input_ids, node_sample_index, image_token_id))
    gathered = jnp.take(node_embeddings, node_index, axis=0).astype(token_embeddings.dtype)
    return jnp.where(is_slot[..., None], gathered, token_embeddings)


def ignore_graph_slots(labels: jax.Array, input_ids: jax.Array, image_token_id: int = IMAGE_TOKEN_ID) -> jax.Array:
    """Labels with IGNORE_INDEX on graph slots (a guard; the host expansion already does this)."""
    return jnp.where(input_ids == image_token_id, IGNORE_INDEX, labels)

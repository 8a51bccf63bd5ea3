"""The multimodal splice on the device: graph-slot tokens are replaced by the projected vectors of the atoms.

Contract with the data pipeline (`omnimol_jax.data.graph_slots` expands a prompt's `<image>` placeholder on the
host into one slot per heavy atom): slot k of row b takes the k-th real node of row b; nodes of a row are
contiguous in the node array and in slot order (what `omnimol_jax.data.graphs` produces; for packed rows,
graphs in the order of their slots). Text-only rows have no slots and stay untouched; padding nodes (row
index -1) are never read. Static shapes, no Python loop over the batch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from omnimol_jax.constants import IGNORE_INDEX, IMAGE_TOKEN_ID


class GraphSlotMismatchError(ValueError):
    """At run time (validate=True), a row's graph slots and atoms differ in number."""


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
        raise GraphSlotMismatchError(f"graph slots minus atoms per row is not zero ({details})")


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

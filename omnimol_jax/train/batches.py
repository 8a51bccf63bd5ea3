"""Placing micro-batches on the mesh: [accum, batch, ...] with the batch axis split like the data."""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from omnimol_jax.data.pipeline import globalize_graph_indices, leaf_sharding
from omnimol_jax.sharding import batch_sharding
from omnimol_jax.train.step import model_batch


def place_micro_batches(batches: Sequence[dict], mesh, *, process_index: int = 0, process_count: int = 1) -> dict:
    """Stacks host micro-batches on a new leading axis (replicated) and shards their batch axis."""
    batches = [model_batch(b) for b in batches]
    if process_count > 1:
        rows = batches[0]["input_ids"].shape[0]
        batches = [dict(b, graphs=globalize_graph_indices(b["graphs"], rows, process_index)) for b in batches]
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *batches)
    data_sharding = batch_sharding(mesh)

    def put(array: np.ndarray) -> jax.Array:
        inner = leaf_sharding(data_sharding, array[0], process_count)
        sharding = NamedSharding(mesh, PartitionSpec(None, *tuple(inner.spec)))
        if process_count > 1:
            global_shape = (array.shape[0], array.shape[1] * process_count) + array.shape[2:]
            return jax.make_array_from_process_local_data(sharding, array, global_shape)
        return jax.device_put(array, sharding)

    return jax.tree.map(put, stacked)

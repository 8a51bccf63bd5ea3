"""The graph batch the model consumes: one padded `jraph.GraphsTuple` plus each node's and each graph's
token-batch row. It sits below both layers that use it: `omnimol_jax.data.graphs` builds it on the host and the
model reads it, so neither imports the other. jraph stays behind this module and that one.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jraph

GraphsTuple = jraph.GraphsTuple


class GraphBatch(NamedTuple):
    """A padded graph batch (a pytree, so it passes through jit).

    graphs: nodes int32 [N_pad, F], edges int32 [E_pad, Fb], senders/receivers int32 [E_pad],
        n_node/n_edge int32 [G_pad]; real graphs first, then jraph's padding graph and empty graphs.
    node_sample_index: int32 [N_pad], the token-batch row of each node, -1 for padding nodes.
    graph_sample_index: int32 [G_pad], the row of each graph, -1 for padding graphs.
    """

    graphs: GraphsTuple
    node_sample_index: jax.Array
    graph_sample_index: jax.Array


def node_mask(batch: GraphBatch) -> jax.Array:
    """bool [N_pad]: True for real nodes (works under jit)."""
    return jraph.get_node_padding_mask(batch.graphs)


def edge_mask(batch: GraphBatch) -> jax.Array:
    return jraph.get_edge_padding_mask(batch.graphs)


def graph_mask(batch: GraphBatch) -> jax.Array:
    return jraph.get_graph_padding_mask(batch.graphs)

"""The MoleculeSTM graph tower: a 5-layer GIN with OGB atom/bond embeddings, per-node outputs.

Computation (docs/omnimol.md §1), for node states h [N, 300] over a padded `jraph.GraphsTuple`:

    h^0_v = sum_i AtomTable_i[x_v,i]                       (one table per atom-feature column)
    layer l: e_uv = sum_k BondTable^l_k[b_uv,k]             (a separate bond embedder per layer)
             m_v  = sum over edges u->v of ReLU(h_u + e_uv)
             z_v  = Lin_out(ReLU(BN_mlp(Lin_in((1 + eps_l) h_v + m_v))))     Lin_in: 300->600, Lin_out: 600->300
             h^{l+1} = BN_l(z), then ReLU on all but the last layer
    output: h^5 [N, 300]; padding nodes are set to 0.

Batch norms always run in inference mode (running mean/var), everything is fp32 and matmuls use
HIGHEST precision (no TF32), dropout is off: the tower is frozen in the paper's recipe. A tower trained
from scratch (no MoleculeSTM file) first gets its running statistics from data (`calibrate_batch_norms`):
with the initial (0, 1) statistics a random GIN maps every atom to nearly the same vector.

Conventions checked against the MoleculeSTM / Omni-Mol code (`GINConv` of `molecule_gnn_model.py`, the
OGB-style variant, not the pretrain-gnns one with self loops and `edge_embedding1/2`):
- `eps` is a learnable per-layer parameter (torch shape [1], initialised 0) and is stored in
  `molecule_model.pth`; it is kept here as a scalar parameter so a trained eps is honoured.
- messages flow from `senders` (PyG `edge_index[0]`, x_j) to `receivers` (`edge_index[1]`), summed;
  bonds are stored in both directions and no self loops are added.
- the atom/bond encoders hold all OGB tables (atom 119,4,12,12,10,6,6,2,2; bond 5,6,2) and sum over the
  feature columns present, so the same weights serve `omnimol` (first 2+2 columns) and `ogb` (9+3) graphs.

Attribute names mirror the torch module (`atom_encoder`, `gnns[l].bond_encoder / mlp_in (mlp.0) /
mlp_norm (mlp.1) / mlp_out (mlp.3) / eps`, `batch_norms[l]`), which keeps `convert/moleculestm.py` a table.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from omnimol_jax.config import GraphConfig
from omnimol_jax.graph_batch import GraphsTuple


class Dense(nnx.Module):
    """y = x @ kernel + bias, kernel [in, out]; torch `nn.Linear` initialisation (U(+-1/sqrt(in)))."""

    def __init__(self, in_features: int, out_features: int, logical_axes: tuple[Optional[str], Optional[str]], *,
                 precision: Optional[jax.lax.Precision] = None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        bound = 1.0 / math.sqrt(in_features)
        init = jax.nn.initializers.uniform(scale=2 * bound)
        self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), param_dtype) - bound,
                                logical_axes=tuple(logical_axes))
        self.bias = nnx.Param(init(rngs.params(), (out_features,), param_dtype) - bound,
                              logical_axes=(logical_axes[1],))
        self.precision = precision

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.dot(x, self.kernel[...].astype(x.dtype), precision=self.precision) + self.bias[...].astype(x.dtype)


class FeatureEmbedding(nnx.Module):
    """Sum of one embedding row per feature column (OGB AtomEncoder / BondEncoder), xavier-uniform init."""

    def __init__(self, table_sizes: Sequence[int], dim: int, *, rngs: nnx.Rngs):
        init = jax.nn.initializers.glorot_uniform()
        self.embeddings = nnx.List([
            nnx.Param(init(rngs.params(), (size, dim), jnp.float32), logical_axes=("gin_vocab", "gin_embed"))
            for size in table_sizes])

    def __call__(self, features: jax.Array) -> jax.Array:
        num_columns = features.shape[-1]
        if num_columns > len(self.embeddings):
            raise ValueError(f"{num_columns} feature columns, but only {len(self.embeddings)} embedding tables")
        out = jnp.take(self.embeddings[0][...], features[..., 0], axis=0)
        for column in range(1, num_columns):
            out = out + jnp.take(self.embeddings[column][...], features[..., column], axis=0)
        return out


class BatchNormInference(nnx.Module):
    """torch BatchNorm1d in eval mode: (x - running_mean) / sqrt(running_var + eps) * weight + bias."""

    def __init__(self, dim: int, logical_axis: str, eps: float):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), logical_axes=(logical_axis,))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32), logical_axes=(logical_axis,))
        self.mean = nnx.BatchStat(jnp.zeros((dim,), jnp.float32), logical_axes=(logical_axis,))
        self.var = nnx.BatchStat(jnp.ones((dim,), jnp.float32), logical_axes=(logical_axis,))
        self.eps = eps

    def __call__(self, x: jax.Array, fit_weights: Optional[jax.Array] = None) -> jax.Array:
        """fit_weights [N] (1 = real row): first set the running statistics to the weighted mean/variance of x."""
        if fit_weights is not None:
            # `where`, not a product: a padding row may hold inf (see GIN._forward), and inf * 0 is NaN
            weight = fit_weights[:, None]
            count = jnp.maximum(fit_weights.sum(), 1.0)
            mean = jnp.where(weight > 0, x * weight, 0.0).sum(0) / count
            self.mean[...] = mean
            self.var[...] = jnp.where(weight > 0, jnp.square(x - mean) * weight, 0.0).sum(0) / count
        return (x - self.mean[...]) / jnp.sqrt(self.var[...] + self.eps) * self.scale[...] + self.bias[...]


class GINConv(nnx.Module):
    def __init__(self, config: GraphConfig, *, rngs: nnx.Rngs):
        d = config.hidden_size
        hp = jax.lax.Precision.HIGHEST
        self.bond_encoder = FeatureEmbedding(config.bond_feature_dims, d, rngs=rngs)
        self.mlp_in = Dense(d, 2 * d, ("gin_embed", "gin_hidden"), precision=hp, rngs=rngs)
        self.mlp_norm = BatchNormInference(2 * d, "gin_hidden", config.batch_norm_eps)
        self.mlp_out = Dense(2 * d, d, ("gin_hidden", "gin_embed"), precision=hp, rngs=rngs)
        self.eps = nnx.Param(jnp.zeros((), jnp.float32), logical_axes=())

    def __call__(self, h: jax.Array, edge_features: jax.Array, senders: jax.Array,
                 receivers: jax.Array, fit_weights: Optional[jax.Array] = None) -> jax.Array:
        edge_embedding = self.bond_encoder(edge_features)
        messages = jax.nn.relu(jnp.take(h, senders, axis=0) + edge_embedding)
        aggregated = jax.ops.segment_sum(messages, receivers, num_segments=h.shape[0])
        z = (1.0 + self.eps[...]) * h + aggregated
        return self.mlp_out(jax.nn.relu(self.mlp_norm(self.mlp_in(z), fit_weights)))


class GIN(nnx.Module):
    """Per-node embeddings [N_pad, hidden] of a padded GraphsTuple (nodes/edges: int feature columns)."""

    def __init__(self, config: GraphConfig = GraphConfig(), *, rngs: nnx.Rngs):
        self.config = config
        d = config.hidden_size
        self.atom_encoder = FeatureEmbedding(config.atom_feature_dims, d, rngs=rngs)
        self.gnns = nnx.List([GINConv(config, rngs=rngs) for _ in range(config.num_layers)])
        self.batch_norms = nnx.List([BatchNormInference(d, "gin_embed", config.batch_norm_eps)
                                     for _ in range(config.num_layers)])

    def __call__(self, graphs: GraphsTuple, node_mask: Optional[jax.Array] = None) -> jax.Array:
        """node_mask bool [N_pad] (True = real node): padding rows of the output are zeroed.

        Padding nodes and edges never influence real nodes anyway: jraph's padding edges join only the
        padding node, and batch norm here is per-node.
        """
        return self._forward(graphs, node_mask, fit_weights=None)

    def calibrate_batch_norms(self, graphs: GraphsTuple, node_mask: jax.Array) -> jax.Array:
        """Sets every batch norm's running mean/variance to those of its input over the real nodes of `graphs`,
        in forward order (each layer sees the already calibrated ones before it), and returns the output.

        For a randomly initialised tower only: its (0, 1) statistics leave the sum aggregations uncentred, so
        after a few layers all atoms share one direction (`omnimol train` logs the mean cosine between atoms
        before and after) and the projected graph tokens carry almost nothing. Calibrated, each output
        feature has mean 0 and variance 1 over the calibration atoms (the biased variance, as torch's
        BatchNorm normalises with in train mode).
        """
        return self._forward(graphs, node_mask, fit_weights=node_mask.astype(jnp.float32))

    def _forward(self, graphs: GraphsTuple, node_mask: Optional[jax.Array],
                 fit_weights: Optional[jax.Array]) -> jax.Array:
        h = self.atom_encoder(graphs.nodes)
        last = self.config.num_layers - 1
        for layer, (conv, norm) in enumerate(zip(self.gnns, self.batch_norms)):
            h = norm(conv(h, graphs.edges, graphs.senders, graphs.receivers, fit_weights), fit_weights)
            if layer != last:
                h = jax.nn.relu(h)
            if node_mask is not None:
                # jraph sends every padding edge to the padding node: summed over thousands of edges, layer after
                # layer, its value overflows to inf. Zeroing padding rows keeps every value finite.
                h = jnp.where(node_mask[:, None], h, 0.0)
        return h


def mean_pairwise_cosine(vectors: jax.Array, node_mask: jax.Array) -> jax.Array:
    """Mean cosine similarity over pairs of distinct real rows, in O(N d): with unit rows u_i and s = sum u_i,
    sum over i != j of u_i . u_j = |s|^2 - n."""
    unit = vectors / jnp.maximum(jnp.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)
    unit = jnp.where(node_mask[:, None], unit, 0.0)
    n = node_mask.sum().astype(jnp.float32)
    total = unit.sum(0)
    return (jnp.dot(total, total) - n) / jnp.maximum(n * (n - 1.0), 1.0)

"""GIN parity with a plain-torch implementation of docs/omnimol.md §1, on real molecules."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from gin_reference_torch import GNNGraphPred, randomize_
from rdkit import RDConfig

from omnimol_jax import graph_batch
from omnimol_jax.config import GraphConfig
from omnimol_jax.convert.moleculestm import load_moleculestm
from omnimol_jax.data import graphs as G
from omnimol_jax.data.featurize import merge_graphs, smiles_to_graph
from omnimol_jax.model.gin import GIN, mean_pairwise_cosine

NCI_SMILES = os.path.join(RDConfig.RDDataDir, "NCI", "first_5K.smi")


def nci_graphs(mode, start=0, count=40):
    with open(NCI_SMILES) as handle:
        lines = handle.readlines()[start:start + count]
    return [smiles_to_graph(line.split()[0], mode) for line in lines]


@pytest.fixture(scope="module")
def reference_and_gin():
    torch.manual_seed(0)
    reference = randomize_(GNNGraphPred(num_layer=5, emb_dim=300), seed=0)
    gin = GIN(GraphConfig(), rngs=nnx.Rngs(0))
    load_moleculestm(gin, {k: v.numpy() for k, v in reference.state_dict().items()})
    return reference, gin


def run_gin(gin, batch):
    graphdef, state = nnx.split(gin)

    @jax.jit
    def forward(state, graphs, mask):
        return nnx.merge(graphdef, state)(graphs, mask)

    device_batch = jax.device_put(batch)
    return np.asarray(forward(state, device_batch.graphs, graph_batch.node_mask(device_batch)))


def run_reference(reference, graph):
    as_long = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.long)
    with torch.no_grad():
        return reference(as_long(graph.node_features), as_long(graph.edge_index), as_long(graph.edge_features)).numpy()


@pytest.mark.parametrize("mode", ["omnimol", "ogb"])
def test_per_node_parity_with_torch_reference(reference_and_gin, mode):
    reference, gin = reference_and_gin
    graphs = nci_graphs(mode)
    budget = G.GraphBudget(max_nodes=1024, max_edges=2048, max_graphs=len(graphs) + 1)
    batch, _ = G.batch_graphs(graphs, budget)
    ours = run_gin(gin, batch)
    expected = run_reference(reference, merge_graphs(graphs))
    num_real = expected.shape[0]
    assert num_real > 400 and ours.shape == (1024, 300)
    np.testing.assert_allclose(ours[:num_real], expected, atol=1e-5, rtol=0)
    assert np.abs(expected).max() > 0.5  # outputs are not trivially small
    assert np.all(ours[num_real:] == 0.0)  # padding rows are zeroed


def test_padding_does_not_change_real_nodes(reference_and_gin):
    _, gin = reference_and_gin
    graphs = nci_graphs("omnimol", start=100, count=12)
    small, _ = G.batch_graphs(graphs, G.GraphBudget(max_nodes=256, max_edges=512, max_graphs=13))
    # More padding, and the same molecules after text-only rows (different offsets).
    large, _ = G.batch_graphs([None, None] + graphs, G.GraphBudget(max_nodes=512, max_edges=1024, max_graphs=40))
    n = sum(g.num_nodes for g in graphs)
    np.testing.assert_array_equal(run_gin(gin, small)[:n], run_gin(gin, large)[:n])
    # Garbage in the padding features does not leak into real nodes either.
    poisoned_nodes = large.graphs.nodes.copy()
    poisoned_nodes[n:] = [118, 3]
    poisoned = large._replace(graphs=large.graphs._replace(nodes=poisoned_nodes))
    np.testing.assert_array_equal(run_gin(gin, poisoned)[:n], run_gin(gin, large)[:n])


def test_eps_and_batch_norm_statistics_matter(reference_and_gin):
    """Guards the parity test against formulas that would ignore eps or the running statistics."""
    reference, gin = reference_and_gin
    graphs = nci_graphs("omnimol", count=5)
    batch, _ = G.batch_graphs(graphs, G.GraphBudget(128, 256, 6))
    base = run_gin(gin, batch)
    n = sum(g.num_nodes for g in graphs)
    layer = gin.gnns[2]
    saved_eps, saved_mean = layer.eps.get_value(), gin.batch_norms[4].mean.get_value()
    try:
        layer.eps.set_value(saved_eps * 0)
        assert np.abs(run_gin(gin, batch)[:n] - base[:n]).max() > 1e-3
        layer.eps.set_value(saved_eps)
        gin.batch_norms[4].mean.set_value(saved_mean * 0)
        assert np.abs(run_gin(gin, batch)[:n] - base[:n]).max() > 1e-3
    finally:
        layer.eps.set_value(saved_eps)
        gin.batch_norms[4].mean.set_value(saved_mean)
    np.testing.assert_array_equal(run_gin(gin, batch), base)


def test_calibration_standardises_every_batch_norm_over_the_real_atoms():
    gin = GIN(GraphConfig(num_layers=3, hidden_size=32), rngs=nnx.Rngs(0))
    graphs = nci_graphs("omnimol", start=300, count=30)
    n = sum(g.num_nodes for g in graphs)
    batch, _ = G.batch_graphs([None] + graphs, G.GraphBudget(max_nodes=1024, max_edges=2048, max_graphs=40))
    device_batch = jax.device_put(batch)
    mask = graph_batch.node_mask(device_batch)

    def unit_cosine(x):
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        return float((x @ x.T).mean())

    random_output = run_gin(gin, batch)[:n]
    assert unit_cosine(random_output) > 0.8  # uncalibrated: every atom points the same way
    calibrate = nnx.jit(lambda tower, graphs, mask: tower.calibrate_batch_norms(graphs, mask))
    returned = np.asarray(calibrate(gin, device_batch.graphs, mask))
    output = run_gin(gin, batch)  # inference mode with the new statistics gives the calibration pass's output
    np.testing.assert_allclose(output, returned, atol=1e-5)
    real = output[:n]
    stored_var = np.asarray(gin.batch_norms[-1].var.get_value())
    live = stored_var > 1e-2
    assert live.sum() > 16
    np.testing.assert_allclose(real.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(real.var(0)[live], 1.0, atol=1e-3)
    assert unit_cosine(real) < 0.2
    # the O(N d) mean cosine the trainer logs == the mean over distinct pairs of the full N x N matrix
    unit = real / np.linalg.norm(real, axis=1, keepdims=True)
    pairs = (unit @ unit.T).sum() - np.trace(unit @ unit.T)
    np.testing.assert_allclose(float(mean_pairwise_cosine(jnp.asarray(output), mask)), pairs / (n * (n - 1)),
                               rtol=1e-4, atol=1e-6)
    # The inner batch norms were fitted too (their input statistics are not the (0, 1) defaults) ...
    for conv in gin.gnns:
        assert np.abs(np.asarray(conv.mlp_norm.mean.get_value())).max() > 1e-3
    # ... and padding rows, even with garbage features, do not enter the statistics.
    poisoned_nodes = batch.graphs.nodes.copy()
    poisoned_nodes[n:] = [118, 3]
    poisoned = jax.device_put(batch._replace(graphs=batch.graphs._replace(nodes=poisoned_nodes)))
    again = GIN(GraphConfig(num_layers=3, hidden_size=32), rngs=nnx.Rngs(0))
    calibrate(again, poisoned.graphs, mask)
    for ours, theirs in zip(jax.tree.leaves(nnx.state(gin, nnx.BatchStat)),
                            jax.tree.leaves(nnx.state(again, nnx.BatchStat))):
        np.testing.assert_allclose(np.asarray(theirs), np.asarray(ours), rtol=1e-6, atol=1e-6)


def test_calibration_stays_finite_when_thousands_of_padding_edges_meet_at_the_padding_node():
    """jraph sends every padding edge to the padding node; over five 300-wide layers its sum used to overflow to
    inf, and inf * 0 made every fitted statistic NaN (the paper's tower, random, in a tiny run)."""
    graphs = nci_graphs("omnimol", start=0, count=20)
    n = sum(g.num_nodes for g in graphs)
    tight, _ = G.batch_graphs(graphs, G.GraphBudget(max_nodes=n + 1, max_edges=sum(g.num_edges for g in graphs) + 1,
                                                     max_graphs=21))
    loose, _ = G.batch_graphs(graphs, G.GraphBudget(max_nodes=n + 64, max_edges=20000, max_graphs=24))
    calibrate = nnx.jit(lambda tower, graphs, mask: tower.calibrate_batch_norms(graphs, mask))
    outputs = []
    for batch in (tight, loose):
        gin = GIN(GraphConfig(), rngs=nnx.Rngs(0))  # MoleculeSTM's shape: 5 layers of 300
        device_batch = jax.device_put(batch)
        out = np.asarray(calibrate(gin, device_batch.graphs, graph_batch.node_mask(device_batch)))
        for stat in jax.tree.leaves(nnx.state(gin, nnx.BatchStat)):
            assert np.isfinite(np.asarray(stat)).all()
        outputs.append(out[:n])
    np.testing.assert_allclose(outputs[1], outputs[0], rtol=1e-4, atol=1e-4)


def test_every_variable_has_logical_axes():
    gin = GIN(GraphConfig(num_layers=2, hidden_size=8), rngs=nnx.Rngs(0))
    variables = list(nnx.to_flat_state(nnx.state(gin)))
    assert len(variables) == 9 + 2 * (3 + 2 + 4 + 2 + 1) + 2 * 4  # tables; per layer: bond, Lin, BN, Lin, eps; BN
    for path, variable in variables:
        axes = variable.get_metadata().get("logical_axes")
        assert axes is not None and len(axes) == np.ndim(variable.get_value()), path
    params = nnx.state(gin, nnx.Param)
    stats = nnx.state(gin, nnx.BatchStat)
    assert len(list(nnx.to_flat_state(stats))) == 2 * 2 * 2  # running mean/var of 2 BNs per layer
    assert len(list(nnx.to_flat_state(params))) == len(variables) - 8

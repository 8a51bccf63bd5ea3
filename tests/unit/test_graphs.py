"""Padded graph batches: static budgets, masks, per-node row index, reporting of what does not fit."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnimol_jax import graph_batch
from omnimol_jax.data import graphs as G
from omnimol_jax.data.featurize import smiles_to_graph

MOLS = ["CCO", "c1ccccc1", "CC(=O)[O-].[Na+]", "O"]  # 3, 6, 5, 1 atoms; 4, 12, 6, 0 directed bonds


def mols(mode="omnimol"):
    return [smiles_to_graph(s, mode) for s in MOLS]


def test_batch_layout_with_text_only_rows():
    ethanol, benzene, acetate, water = mols()
    budget = G.GraphBudget(max_nodes=64, max_edges=128, max_graphs=6)
    batch, skipped = G.batch_graphs([ethanol, None, benzene, water, None], budget, record_ids=list("abcde"))
    assert skipped == []
    g = batch.graphs
    assert g.nodes.shape == (64, 2) and g.edges.shape == (128, 2) and g.n_node.shape == (6,)
    assert all(x.dtype == np.int32 for x in (g.nodes, g.edges, g.senders, g.receivers, g.n_node, g.n_edge))
    # Real graphs first (rows 0, 2, 3), then jraph's padding graph holding every padding node and edge.
    assert g.n_node.tolist() == [3, 6, 1, 64 - 10, 0, 0]
    assert g.n_edge.tolist() == [4, 12, 0, 128 - 16, 0, 0]
    assert batch.graph_sample_index.tolist() == [0, 2, 3, -1, -1, -1]
    assert batch.node_sample_index[:11].tolist() == [0, 0, 0, 2, 2, 2, 2, 2, 2, 3, -1]
    assert np.all(batch.node_sample_index[10:] == -1)
    # Benzene's edges are shifted by ethanol's 3 atoms; padding edges join only the first padding node.
    np.testing.assert_array_equal(g.senders[4:16], benzene.edge_index[0] + 3)
    assert np.all(g.senders[16:] == 10) and np.all(g.receivers[16:] == 10)
    np.testing.assert_array_equal(g.nodes[3:9], benzene.node_features)


def test_masks_agree_with_row_index_under_jit():
    batch, _ = G.batch_graphs(mols() + [None], G.GraphBudget(32, 64, 8))
    device_batch = jax.device_put(batch)
    masks = jax.jit(lambda b: (graph_batch.node_mask(b), graph_batch.edge_mask(b), graph_batch.graph_mask(b)))
    node_mask, edge_mask, graph_mask = masks(device_batch)
    np.testing.assert_array_equal(np.asarray(node_mask), batch.node_sample_index >= 0)
    assert int(node_mask.sum()) == 15 and int(edge_mask.sum()) == 22
    assert np.asarray(graph_mask).tolist() == [True] * 4 + [False] * 4


def test_all_text_batch_needs_feature_widths_and_has_no_real_nodes():
    budget = G.GraphBudget(16, 32, 3)
    with pytest.raises(ValueError, match="feature_widths"):
        G.batch_graphs([None, None], budget)
    batch, skipped = G.batch_graphs([None, None], budget, feature_widths=(9, 3))
    assert skipped == [] and batch.graphs.nodes.shape == (16, 9) and batch.graphs.edges.shape == (32, 3)
    assert not np.any(np.asarray(graph_batch.node_mask(batch)))
    assert np.all(batch.node_sample_index == -1)


def test_overflow_strict_raises_naming_records():
    budget = G.GraphBudget(max_nodes=11, max_edges=64, max_graphs=8)  # 10 real node slots: water still fits
    with pytest.raises(G.GraphBatchError) as info:
        G.batch_graphs(mols(), budget, record_ids=["r-ethanol", "r-benzene", "r-acetate", "r-water"])
    message = str(info.value)
    assert "r-acetate" in message and "batch budget exceeded" in message
    assert "r-ethanol" not in message and "r-water" not in message
    assert [s.record_id for s in info.value.skipped] == ["r-acetate"]


def test_overflow_lenient_skips_and_counts():
    budget = G.GraphBudget(max_nodes=8, max_edges=64, max_graphs=8)  # 7 real node slots
    big = smiles_to_graph("CCCCCCCCCC")  # 10 atoms: can never fit
    report = G.SkipReport()
    batch, skipped = G.batch_graphs([mols()[0], big, mols()[1], mols()[3]], budget, record_ids=["a", "b", "c", "d"],
                                    strict=False, report=report)
    assert [(s.record_id, s.position, s.row) for s in skipped] == [("b", 1, 1), ("c", 2, 2)]
    assert skipped[0].reason.startswith("molecule too large: 10 atoms")
    assert skipped[1].reason.startswith("batch budget exceeded")
    assert batch.graph_sample_index[:3].tolist() == [0, 3, -1]  # rows 1 and 2 have no nodes
    assert report.count == 2
    assert report.by_reason == {"molecule too large": 1, "batch budget exceeded": 1}
    assert report.examples[0][0] == "b"


def test_packed_rows():
    ethanol, benzene, _, water = mols()
    batch, _ = G.batch_graphs([ethanol, water, benzene], G.GraphBudget(16, 32, 4), rows=[0, 0, 1])
    assert batch.node_sample_index[:10].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="non-decreasing"):
        G.batch_graphs([ethanol, water], G.GraphBudget(16, 32, 4), rows=[1, 0])


def test_feature_width_mismatch_is_an_error():
    with pytest.raises(ValueError, match="feature widths"):
        G.batch_graphs([smiles_to_graph("CC", "omnimol"), smiles_to_graph("CC", "ogb")], G.GraphBudget(16, 32, 4))


def test_choose_budget_covers_the_percentile_and_rounds():
    rng = np.random.default_rng(1)
    nodes = rng.integers(5, 60, size=5000)
    nodes[::10] = 0  # text-only samples
    edges = 2 * nodes + rng.integers(0, 8, size=5000) * (nodes > 0)
    budget = G.choose_budget(nodes, edges, batch_size=16, percentile=99.0)
    assert budget.max_nodes % 64 == 0 and budget.max_edges % 128 == 0 and budget.max_graphs == 17
    # Fresh random batches fit at (about) the requested rate.
    fits = [budget.fits(int(nodes[i].sum()), int(edges[i].sum()), 16)
            for i in (rng.choice(5000, 16, replace=False) for _ in range(2000))]
    assert np.mean(fits) >= 0.985
    # The budget is not wasteful: below the worst case of 16 largest molecules.
    assert budget.max_nodes < 16 * 60
    pow2 = G.choose_budget(nodes, edges, batch_size=16, rounding="power_of_two")
    assert pow2.max_nodes & (pow2.max_nodes - 1) == 0 and pow2.max_nodes >= budget.max_nodes - 64
    # Deterministic given the seed; the largest single sample always fits.
    assert G.choose_budget(nodes, edges, 16) == budget
    single = G.choose_budget([3, 3, 300], [4, 4, 600], batch_size=1, percentile=50)
    assert single.real_nodes >= 300 and single.max_edges >= 600


def test_budget_validation_and_rounding_helpers():
    with pytest.raises(ValueError):
        G.GraphBudget(1, 0, 2)
    assert G.round_up(65, 64) == 128 and G.round_up(0, 64) == 64
    assert G.next_power_of_two(65) == 128 and G.next_power_of_two(64) == 64
    budget = G.GraphBudget(10, 20, 3)
    assert budget.fits(9, 20, 2) and not budget.fits(10, 20, 2) and not budget.fits(9, 20, 3)


def test_jit_compiles_once_for_a_fixed_budget():
    budget = G.GraphBudget(32, 64, 5)
    traces = []

    @jax.jit
    def total_features(batch):
        traces.append(1)
        return jnp.sum(jnp.where(graph_batch.node_mask(batch)[:, None], batch.graphs.nodes, 0))

    a, _ = G.batch_graphs(mols()[:2], budget)
    b, _ = G.batch_graphs([None] + mols()[2:], budget)
    assert int(total_features(a)) == int(mols()[0].node_features.sum() + mols()[1].node_features.sum())
    assert int(total_features(b)) == int(mols()[2].node_features.sum() + mols()[3].node_features.sum())
    assert len(traces) == 1


def _packed_row(samples, nodes, edges, width=2):
    """One packed row as Grain's packer lays it out: each sample's atoms and bonds appended, segment ids 1, 2, ...,
    bond indices local to their sample; then padding (segment 0) with junk values that must never be read."""
    node_features = np.full((nodes, width), 7, np.int32)
    node_segments = np.zeros(nodes, np.int32)
    edge_index = np.full((edges, 2), 5, np.int32)
    edge_features = np.full((edges, width), 9, np.int32)
    edge_segments = np.zeros(edges, np.int32)
    n = e = 0
    for segment, graph in enumerate(samples, start=1):
        if graph is None:
            continue
        node_features[n:n + graph.num_nodes] = graph.node_features
        node_segments[n:n + graph.num_nodes] = segment
        edge_index[e:e + graph.num_edges] = graph.edge_index.T
        edge_features[e:e + graph.num_edges] = graph.edge_features
        edge_segments[e:e + graph.num_edges] = segment
        n, e = n + graph.num_nodes, e + graph.num_edges
    return node_features, node_segments, edge_index, edge_features, edge_segments


def test_graphs_of_packed_rows_equal_batching_the_samples():
    ethanol, benzene, acetate, water = mols()
    rows = [[ethanol, None, benzene], [None], [water, acetate, ethanol], []]
    packed = [_packed_row(r, nodes=24, edges=40) for r in rows]
    budget = G.GraphBudget(max_nodes=104, max_edges=160, max_graphs=16)
    direct = G.batch_row_graphs(*[[p[i] for p in packed] for i in range(5)], budget)
    graphs = [g for r in rows for g in r if g is not None]
    row_of = [i for i, r in enumerate(rows) for g in r if g is not None]
    expected, _ = G.batch_graphs(graphs, budget, rows=row_of)
    for got, want in zip(jax.tree.leaves(direct), jax.tree.leaves(expected)):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="more than the budget"):
        G.batch_row_graphs(*[[p[i] for p in packed] for i in range(5)], G.GraphBudget(16, 160, 16))


def test_prompt_budget_follows_the_token_shape_and_falls_back_to_powers_of_two():
    from omnimol_jax.data.graphs import prompt_graph_budget

    ethanol, aspirin = smiles_to_graph("CCO"), smiles_to_graph("CC(=O)Oc1ccccc1C(=O)O")
    # 4 rows x 32 slots: one node per slot (+1 padding node), two directed edges per slot, a graph per row (+1)
    assert prompt_graph_budget([ethanol, None, aspirin], 4, bucket=32) == G.GraphBudget(129, 256, 5)
    assert prompt_graph_budget([None, None], 4, bucket=32) == G.GraphBudget(129, 256, 5)
    assert (aspirin.num_nodes, aspirin.num_edges) == (13, 26)
    assert prompt_graph_budget([aspirin], 1, bucket=13) == G.GraphBudget(14, 26, 2)  # exactly full
    # with 12 slots its atoms and bonds overflow: powers of two, as without a bucket
    fallback = prompt_graph_budget([aspirin], 1, bucket=12)
    assert fallback == prompt_graph_budget([aspirin], 1) == G.GraphBudget(64, 128, 2)

"""Batching molecule graphs into one padded `jraph.GraphsTuple` with static budgets.

The batch type itself (`GraphBatch`, the model's input) lives in `omnimol_jax.graph_batch`; this module
builds it on the host. jraph stays behind these two modules (`GraphsTuple`, `batch_np`, `pad_with_graphs`
and the padding masks), so the dependency can be replaced without touching other code.

A batch holds at most one graph per sample (row) of the token batch; graphs appear in row order (for
packed rows: in the order of their graph slots), so that the k-th graph slot of a row is the k-th real node
of that row. `GraphBatch.node_sample_index` gives each node's row (-1 for padding), which is all the
splice needs.

Budgets (nodes, edges, graphs) are static so jit compiles once; `choose_budget` picks them from data
statistics (a percentile of the per-batch totals) and rounds them up. A molecule that cannot fit is never
dropped silently: `batch_graphs` either raises `GraphBatchError` naming the records (strict) or leaves
the sample out of the graph batch and reports it (record id, reason) in the returned list and in an
optional `SkipReport`; the caller must then drop or mask that sample's tokens.
"""
from __future__ import annotations

import collections
import dataclasses
import math
from typing import TYPE_CHECKING, Literal, Optional, Sequence

import jraph
import numpy as np

from omnimol_jax.graph_batch import GraphBatch, GraphsTuple

if TYPE_CHECKING:  # featurize imports RDKit; model code imports this module without it
    from omnimol_jax.data.featurize import MolGraph



@dataclasses.dataclass(frozen=True)
class GraphBudget:
    """Static sizes of a padded graph batch. Padding takes at least one node and one graph, so real
    graphs get at most `max_nodes - 1` nodes, `max_edges` edges and `max_graphs - 1` graphs."""

    max_nodes: int
    max_edges: int
    max_graphs: int

    def __post_init__(self):
        if self.max_nodes < 2 or self.max_edges < 0 or self.max_graphs < 2:
            raise ValueError(f"a graph budget needs max_nodes >= 2, max_edges >= 0, max_graphs >= 2; got {self}")

    @property
    def real_nodes(self) -> int:
        return self.max_nodes - 1

    @property
    def real_graphs(self) -> int:
        return self.max_graphs - 1

    def fits(self, num_nodes: int, num_edges: int, num_graphs: int) -> bool:
        return num_nodes <= self.real_nodes and num_edges <= self.max_edges and num_graphs <= self.real_graphs


def round_up(value: int, multiple: int) -> int:
    return max(multiple, -(-int(value) // multiple) * multiple)


def next_power_of_two(value: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, int(value)))))


def choose_budget(num_nodes: Sequence[int], num_edges: Sequence[int], batch_size: int, *,
                  percentile: float = 99.0, rounding: Literal["multiple", "power_of_two"] = "multiple",
                  node_multiple: int = 64, edge_multiple: int = 128, num_simulated_batches: int = 2000,
                  seed: int = 0) -> GraphBudget:
    """Budget that covers `percentile`% of random batches of `batch_size` samples.

    num_nodes / num_edges: per-sample totals (0 for text-only samples) over the data set or a sample of
    it. Batches are simulated by drawing `batch_size` samples without replacement; the percentile of their
    totals (+1 padding node) is rounded up to a multiple (or the next power of two) so that budgets
    chosen on similar data coincide and recompiles stay rare. At least the largest single sample fits.
    """
    nodes = np.asarray(num_nodes, dtype=np.int64)
    edges = np.asarray(num_edges, dtype=np.int64)
    if nodes.ndim != 1 or nodes.shape != edges.shape or nodes.size == 0:
        raise ValueError(f"num_nodes and num_edges must be equal-length, non-empty 1-D; got {nodes.shape}, "
                         f"{edges.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = np.random.default_rng(seed)
    size = min(batch_size, nodes.size)
    picks = np.stack([rng.choice(nodes.size, size=size, replace=False) for _ in range(num_simulated_batches)])
    node_totals = nodes[picks].sum(axis=1) * batch_size / size  # scale up if the sample is smaller than a batch
    edge_totals = edges[picks].sum(axis=1) * batch_size / size
    need_nodes = max(float(np.percentile(node_totals, percentile)), float(nodes.max())) + 1
    need_edges = max(float(np.percentile(edge_totals, percentile)), float(edges.max()))
    if rounding == "multiple":
        max_nodes, max_edges = round_up(math.ceil(need_nodes), node_multiple), round_up(math.ceil(need_edges),
                                                                                     edge_multiple)
    elif rounding == "power_of_two":
        max_nodes, max_edges = next_power_of_two(math.ceil(need_nodes)), next_power_of_two(math.ceil(need_edges))
    else:
        raise ValueError(f"rounding must be 'multiple' or 'power_of_two', got {rounding!r}")
    return GraphBudget(max_nodes=max_nodes, max_edges=max_edges, max_graphs=batch_size + 1)


def prompt_graph_budget(graphs: Sequence[Optional["MolGraph"]], rows: int, bucket: Optional[int] = None) -> GraphBudget:
    """A budget that holds every graph of the batch, chosen so that few distinct shapes (compiles) occur.

    With the prompt `bucket` (generation: rows x bucket token slots), the budget follows the token shape alone:
    a node per token slot (a molecule's atoms each take a slot, so they always fit) and two directed edges per
    slot (a molecule has about 1.1 bonds per atom, and prompts also hold text). Batches of one prompt shape then
    share one program whatever their molecules, or whether they have any. Otherwise, or when a batch's bonds
    overflow that, the node / edge totals are rounded up to powers of two.
    """
    nodes = sum(g.num_nodes for g in graphs if g is not None)
    edges = sum(g.num_edges for g in graphs if g is not None)
    if bucket is not None:
        slots = rows * int(bucket)
        if nodes <= slots and edges <= 2 * slots:
            return GraphBudget(max_nodes=slots + 1, max_edges=2 * slots, max_graphs=rows + 1)
    return GraphBudget(max_nodes=max(64, next_power_of_two(nodes + 1)), max_edges=max(128, next_power_of_two(edges)),
                       max_graphs=rows + 1)


@dataclasses.dataclass(frozen=True)
class SkippedMolecule:
    """A sample whose graph was left out: its record id, its position in the input list, its row."""

    record_id: str
    position: int
    row: int
    reason: str


class GraphBatchError(ValueError):
    """Molecules did not fit the budget (or failed earlier) in strict mode; names every record."""

    def __init__(self, skipped: Sequence[SkippedMolecule]):
        self.skipped = tuple(skipped)
        lines = "; ".join(f"record {s.record_id!r} (row {s.row}): {s.reason}" for s in self.skipped)
        super().__init__(f"{len(self.skipped)} molecule(s) left out of the graph batch: {lines}")


class SkipReport:
    """Counts molecules left out (by reason) and keeps the first `max_examples` (record id, reason)."""

    def __init__(self, max_examples: int = 100):
        self.max_examples = max_examples
        self.count = 0
        self.by_reason: collections.Counter[str] = collections.Counter()
        self.examples: list[tuple[str, str]] = []

    def add(self, record_id: str, reason: str) -> None:
        self.count += 1
        # Group by the reason's kind (text before the first ':'), so counts stay readable.
        self.by_reason[reason.split(":")[0]] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append((str(record_id), reason))

    def summary(self) -> dict:
        return {"skipped": self.count, "by_reason": dict(self.by_reason), "examples": self.examples[:10]}


def _empty_graphs(num_node_features: int, num_edge_features: int) -> GraphsTuple:
    return GraphsTuple(
        nodes=np.zeros((0, num_node_features), np.int32), edges=np.zeros((0, num_edge_features), np.int32),
        senders=np.zeros((0,), np.int32), receivers=np.zeros((0,), np.int32),
        n_node=np.zeros((0,), np.int32), n_edge=np.zeros((0,), np.int32), globals=None)


def _as_graphs_tuple(graph: "MolGraph") -> GraphsTuple:
    return GraphsTuple(
        nodes=graph.node_features, edges=graph.edge_features,
        senders=graph.edge_index[0], receivers=graph.edge_index[1],
        n_node=np.array([graph.num_nodes], np.int32), n_edge=np.array([graph.num_edges], np.int32), globals=None)


def batch_graphs(graphs: Sequence[Optional["MolGraph"]], budget: GraphBudget, *,
                 record_ids: Optional[Sequence[str]] = None, rows: Optional[Sequence[int]] = None,
                 strict: bool = True, report: Optional[SkipReport] = None,
                 feature_widths: Optional[tuple[int, int]] = None) -> tuple[GraphBatch, list[SkippedMolecule]]:
    """Pads graphs (None for text-only samples) into a GraphBatch of exactly `budget` size.

    By default sample i is token-batch row i. With packing, `rows[i]` names the row of sample i; samples
    must then come in row order and, within a row, in the order of their graph slots.
    Samples are taken in order; a graph that does not fit the remaining budget is left out and reported
    (strict=False) or raises GraphBatchError after collecting every such record (strict=True).
    `feature_widths` (F, Fb) is needed only when no sample has a graph.
    Returns (batch, skipped); a skipped sample has no nodes in the batch.
    """
    ids = [str(i) for i in (record_ids if record_ids is not None else range(len(graphs)))]
    if len(ids) != len(graphs):
        raise ValueError(f"{len(graphs)} graphs but {len(ids)} record ids")
    rows = list(range(len(graphs))) if rows is None else [int(r) for r in rows]
    if len(rows) != len(graphs) or any(b < a for a, b in zip(rows, rows[1:])) or (rows and rows[0] < 0):
        raise ValueError(f"rows must be one non-negative, non-decreasing row index per graph; got {rows}")
    kept: list[tuple[int, "MolGraph"]] = []
    skipped: list[SkippedMolecule] = []
    used_nodes = used_edges = 0
    for index, graph in enumerate(graphs):
        row = rows[index]
        if graph is None:
            continue
        if not budget.fits(graph.num_nodes, graph.num_edges, 1):
            reason = (f"molecule too large: {graph.num_nodes} atoms / {graph.num_edges} directed bonds, the budget "
                      f"holds {budget.real_nodes} / {budget.max_edges}")
        elif not budget.fits(used_nodes + graph.num_nodes, used_edges + graph.num_edges, len(kept) + 1):
            reason = (f"batch budget exceeded: {used_nodes} + {graph.num_nodes} atoms, {used_edges} + "
                      f"{graph.num_edges} bonds, {len(kept) + 1} graphs > {budget.real_nodes} / {budget.max_edges} "
                      f"/ {budget.real_graphs}")
        else:
            kept.append((row, graph))
            used_nodes += graph.num_nodes
            used_edges += graph.num_edges
            continue
        skipped.append(SkippedMolecule(ids[index], index, row, reason))
    if skipped and strict:
        raise GraphBatchError(skipped)
    if report is not None:
        for s in skipped:
            report.add(s.record_id, s.reason)

    if kept:
        widths = (kept[0][1].node_features.shape[1], kept[0][1].edge_features.shape[1])
        for row, graph in kept:
            if (graph.node_features.shape[1], graph.edge_features.shape[1]) != widths:
                raise ValueError(f"row {row}: feature widths {graph.node_features.shape[1]}/"
                                 f"{graph.edge_features.shape[1]} differ from the batch's {widths}")
        real = jraph.batch_np([_as_graphs_tuple(g) for _, g in kept])
    else:
        if feature_widths is None:
            raise ValueError("no row has a graph: pass feature_widths=(atom features, bond features)")
        real = _empty_graphs(*feature_widths)
    return _pad_to_budget(real, [row for row, _ in kept], budget), skipped


def batch_row_graphs(node_features: Sequence[np.ndarray], node_segments: Sequence[np.ndarray],
                     edge_index: Sequence[np.ndarray], edge_features: Sequence[np.ndarray],
                     edge_segments: Sequence[np.ndarray], budget: GraphBudget) -> GraphBatch:
    """The graph batch of packed rows, read straight from each row's node and bond arrays (no per-sample graphs).

    Row r: node_features [n, F] and node_segments [n] (the sample each atom belongs to, 0 = padding);
    edge_index [e, 2] (atom indices local to their sample), edge_features [e, Fb], edge_segments [e]. Each
    (row, segment) with atoms is one graph; graphs come in row order, then segment order, which is the order of
    the rows' graph slots. Raises ValueError when the rows hold more than the budget.
    """
    nodes, edges, senders, receivers, n_node, n_edge, graph_rows = [], [], [], [], [], [], []
    base = 0
    for row, (feats, segments) in enumerate(zip(node_features, node_segments)):
        real = np.flatnonzero(segments > 0)
        if real.size == 0:
            continue
        order = real[np.argsort(segments[real], kind="stable")]  # atoms grouped by sample, in slot order
        graph_ids, counts = np.unique(segments[order], return_counts=True)
        starts = base + np.concatenate([[0], np.cumsum(counts)[:-1]])
        edge_real = np.flatnonzero(edge_segments[row] > 0)
        edge_order = edge_real[np.argsort(edge_segments[row][edge_real], kind="stable")]
        edge_graph = np.searchsorted(graph_ids, edge_segments[row][edge_order])
        local = edge_index[row][edge_order]
        nodes.append(feats[order])
        edges.append(edge_features[row][edge_order])
        senders.append(local[:, 0] + starts[edge_graph])
        receivers.append(local[:, 1] + starts[edge_graph])
        n_node.append(counts)
        n_edge.append(np.bincount(edge_graph, minlength=len(graph_ids)))
        graph_rows.extend([row] * len(graph_ids))
        base += int(counts.sum())
    if not nodes:
        real_graphs = _empty_graphs(node_features[0].shape[1], edge_features[0].shape[1])
    else:
        real_graphs = GraphsTuple(nodes=np.concatenate(nodes), edges=np.concatenate(edges),
                                  senders=np.concatenate(senders), receivers=np.concatenate(receivers),
                                  n_node=np.concatenate(n_node), n_edge=np.concatenate(n_edge), globals=None)
    if not budget.fits(base, len(real_graphs.senders), len(graph_rows)):
        raise ValueError(f"the rows hold {base} atoms, {len(real_graphs.senders)} bonds and {len(graph_rows)} "
                         f"graphs, more than the budget {budget}")
    return _pad_to_budget(real_graphs, graph_rows, budget)


def _pad_to_budget(real: GraphsTuple, rows: Sequence[int], budget: GraphBudget) -> GraphBatch:
    """Pads concatenated real graphs (graph i in token-batch row rows[i]) to exactly the budget's sizes."""
    padded = jraph.pad_with_graphs(real, n_node=budget.max_nodes, n_edge=budget.max_edges,
                                   n_graph=budget.max_graphs)
    padded = padded._replace(
        nodes=padded.nodes.astype(np.int32), edges=padded.edges.astype(np.int32),
        senders=padded.senders.astype(np.int32), receivers=padded.receivers.astype(np.int32),
        n_node=padded.n_node.astype(np.int32), n_edge=padded.n_edge.astype(np.int32))
    graph_rows = np.full((budget.max_graphs,), -1, np.int32)
    graph_rows[:len(rows)] = rows
    used_nodes = int(np.sum(real.n_node))
    node_rows = np.full((budget.max_nodes,), -1, np.int32)
    node_rows[:used_nodes] = np.repeat(graph_rows[:len(rows)], np.asarray(real.n_node, np.int64))
    return GraphBatch(graphs=padded, node_sample_index=node_rows, graph_sample_index=graph_rows)

"""Rows and batches of fixed shape: one sample per row (`pad`), several per row (`pack`, Grain's first-fit packer:
tokens, atoms and bonds each within the row budget), and the assembly of rows into the model batch.

The batch's graphs are built straight from the packed node and bond arrays of the rows: atoms are packed once
and never cut back into per-sample graphs.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import grain
import numpy as np

from omnimol_jax.config import DataConfig
from omnimol_jax.constants import IGNORE_INDEX, IMAGE_TOKEN_ID
from omnimol_jax.data.graphs import GraphBatch, GraphBudget, batch_row_graphs


def _padded(array: np.ndarray, length: int, fill: int) -> np.ndarray:
    out = np.full((length,) + array.shape[1:], fill, dtype=np.int32)
    out[:len(array)] = array
    return out


def _segment_ids(length: int, used: int) -> np.ndarray:
    ids = np.zeros(length, np.int32)
    ids[:used] = 1
    return ids


def single_sample_row(sample: Mapping[str, Any], seq_len: int, nodes: int, edges: int, pad_id: int) -> dict:
    """One sample as a row in the layout the packer emits (segment ids 1 on real entries)."""
    length = len(sample["input_ids"])
    row = {
        "input_ids": _padded(sample["input_ids"], seq_len, pad_id),
        "labels": _padded(sample["labels"], seq_len, IGNORE_INDEX),
        "input_ids_segment_ids": _segment_ids(seq_len, length),
        "input_ids_positions": np.where(np.arange(seq_len) < length, np.arange(seq_len), 0).astype(np.int32),
        "task_id": sample["task_id"].astype(np.int32),
        "task_id_segment_ids": np.ones(1, np.int32),
        "node_features": _padded(sample["node_features"], nodes, 0),
        "node_features_segment_ids": _segment_ids(nodes, len(sample["node_features"])),
        "edge_index": _padded(sample["edge_index"], edges, 0),
        "edge_index_segment_ids": _segment_ids(edges, len(sample["edge_index"])),
        "edge_features": _padded(sample["edge_features"], edges, 0),
        # per sample in the row, its list of rejections (the packer's layout for the meta feature)
        "rejections": [list(sample.get("rejections", []))],
    }
    return row


class SingleSampleRow:
    def __init__(self, seq_len: int, nodes: int, edges: int, pad_id: int):
        self.seq_len, self.nodes, self.edges, self.pad_id = seq_len, nodes, edges, pad_id

    def __call__(self, sample: dict) -> dict:
        return single_sample_row(sample, self.seq_len, self.nodes, self.edges, self.pad_id)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def graph_budget_for(batch_size: int, nodes_per_row: int, edges_per_row: int, segments_per_row: int) -> GraphBudget:
    """Budget of the graph batch: every row's atoms, bonds and graphs fit, plus jraph's padding node/graph;
    rounded up to multiples of 8 so sharding over up to 8 data shards divides them."""
    return GraphBudget(max_nodes=_round_up(batch_size * nodes_per_row + 1, 8),
                       max_edges=_round_up(max(batch_size * edges_per_row, 1), 8),
                       max_graphs=_round_up(batch_size * segments_per_row + 1, 8))


def packed_rows(samples: grain.IterDataset, config: DataConfig, pad_id: int, batch_rows: int) -> grain.IterDataset:
    """Grain's first-fit packing of samples into rows of `seq_len` tokens, `row_nodes` atoms, `row_edges` bonds
    and at most `max_samples_per_row` samples; bins are shuffled (seeded) within a window of batches of
    `batch_rows` rows."""
    segments = config.max_samples_per_row
    length_struct = {"input_ids": config.seq_len, "labels": config.seq_len, "task_id": segments,
                     "node_features": config.row_nodes, "edge_index": config.row_edges,
                     "edge_features": config.row_edges}
    padding = {"input_ids": pad_id, "labels": IGNORE_INDEX, "task_id": -1,
               "node_features": 0, "edge_index": 0, "edge_features": 0}
    return grain.experimental.FirstFitPackIterDataset(
        samples, length_struct=length_struct, num_packing_bins=batch_rows * config.pack_window_batches,
        seed=config.seed, shuffle_bins=True, meta_features=("rejections",), padding_struct=padding,
        max_sequences_per_bin=segments)


class BatchAssembler:
    """Rows (packed or single-sample, identical shapes) -> the model batch.

    Output: input_ids / labels / positions / segment_ids / attention_mask / token_task_ids int32 [B, S];
    task_ids int32 [B, M] (task of segment j+1 of each row, -1 for none). Task ids index the pipeline's
    `task_keys` (the mixture's order: the one task numbering). graphs: GraphBatch whose node
    `node_sample_index` is the row; rejections: the bad records skipped before these samples.
    """

    def __init__(self, batch_size: int, segments_per_row: int, pad_id: int):
        self.batch_size = batch_size
        self.segments_per_row = segments_per_row
        self.pad_id = pad_id

    def empty_row_like(self, row: Mapping[str, Any]) -> dict:
        empty = {}
        for key, value in row.items():
            if key == "rejections":
                empty[key] = []
            elif key == "input_ids":
                empty[key] = np.full_like(value, self.pad_id)
            elif key == "labels":
                empty[key] = np.full_like(value, IGNORE_INDEX)
            elif key == "task_id":
                empty[key] = np.full_like(value, -1)
            else:
                empty[key] = np.zeros_like(value)
        return empty

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict:
        rows = list(rows)
        if not rows:
            raise ValueError("cannot assemble an empty batch")
        while len(rows) < self.batch_size:  # the last, partial batch of a finite stream keeps the static shape
            rows.append(self.empty_row_like(rows[0]))
        seq_len = len(rows[0]["input_ids"])
        nodes_per_row = len(rows[0]["node_features"])
        edges_per_row = len(rows[0]["edge_index"])
        segment_ids = np.stack([r["input_ids_segment_ids"] for r in rows]).astype(np.int32)
        positions = np.stack([r["input_ids_positions"] for r in rows]).astype(np.int32)
        input_ids = np.stack([r["input_ids"] for r in rows]).astype(np.int32)
        labels = np.stack([r["labels"] for r in rows]).astype(np.int32)
        input_ids = np.where(segment_ids > 0, input_ids, self.pad_id)
        labels = np.where(segment_ids > 0, labels, IGNORE_INDEX)
        positions = np.where(segment_ids > 0, positions, 0)
        task_ids = np.full((self.batch_size, self.segments_per_row), -1, np.int32)
        token_task_ids = np.full((self.batch_size, seq_len), -1, np.int32)
        for row_index, row in enumerate(rows):
            used = int(np.count_nonzero(row["task_id_segment_ids"]))
            row_tasks = np.asarray(row["task_id"][:used], np.int32)
            task_ids[row_index, :used] = row_tasks
            seg = segment_ids[row_index]
            token_task_ids[row_index] = np.where(seg > 0, np.concatenate([[-1], row_tasks])[seg], -1)
        budget = graph_budget_for(self.batch_size, nodes_per_row, edges_per_row, self.segments_per_row)
        graph_batch = batch_row_graphs(
            [np.asarray(r["node_features"], np.int32) for r in rows], [r["node_features_segment_ids"] for r in rows],
            [np.asarray(r["edge_index"], np.int32) for r in rows], [np.asarray(r["edge_features"], np.int32)
                                                                   for r in rows],
            [r["edge_index_segment_ids"] for r in rows], budget)
        rejections = [list(r) for row in rows for per_sample in row.get("rejections", []) for r in per_sample]
        return {
            "input_ids": input_ids, "labels": labels, "positions": positions, "segment_ids": segment_ids,
            "attention_mask": (segment_ids > 0).astype(np.int32), "task_ids": task_ids,
            "token_task_ids": token_task_ids, "graphs": graph_batch, "rejections": rejections,
        }


def batch_statistics(batch: Mapping[str, Any]) -> dict[str, float]:
    """Share of real tokens and real atom slots in a host batch (for logs and the benchmark)."""
    segment_ids = np.asarray(batch["segment_ids"])
    graphs: GraphBatch = batch["graphs"]
    node_rows = np.asarray(graphs.node_sample_index)
    slots = int(np.count_nonzero(np.asarray(batch["input_ids"]) == IMAGE_TOKEN_ID))
    return {"real_token_share": float(np.count_nonzero(segment_ids) / segment_ids.size),
            "real_node_share": float(np.count_nonzero(node_rows >= 0) / node_rows.size),
            "samples": int(np.count_nonzero(np.asarray(batch["task_ids"]) >= 0)),
            "graph_slots": slots}

"""Windowed length bucketing (`data.batching: bucket`): a few static row lengths instead of one.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import grain
import numpy as np

from omnimol_jax.config import DataConfig
from omnimol_jax.data.packing import single_sample_row


class BucketBatchesIterDataset(grain.IterDataset):
    """Windowed length bucketing: read `window` samples, place each in the smallest bucket whose row length,
    atom and bond budgets hold it, cut each bucket (smallest first, leftovers moving up) into batches of
    `batch_size` rows and emit them in a seeded order. State: the parent state at the window start plus
    the number of batches emitted from the window, so a restore rebuilds the window exactly."""

    def __init__(self, parent: grain.IterDataset, config: DataConfig, pad_id: int, batch_rows: int):
        super().__init__(parent)
        self.config = config
        self.pad_id = pad_id
        self.batch_rows = batch_rows

    def __iter__(self) -> "BucketBatchesIterator":
        return BucketBatchesIterator(self._parent.__iter__(), self.config, self.pad_id, self.batch_rows)


class BucketBatchesIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, config: DataConfig, pad_id: int, batch_rows: int):
        super().__init__(parent)
        self.config = config
        self.pad_id = pad_id
        self.batch_rows = batch_rows
        self.window_size = batch_rows * config.bucket_window_batches
        lengths = config.buckets
        self.buckets = [(length, max(1, config.row_nodes * length // config.seq_len),
                         max(1, config.row_edges * length // config.seq_len)) for length in lengths]
        self._window_state = self._parent.get_state()
        self._window_index = 0
        self._batches: Optional[list[list[dict]]] = None
        self._emitted = 0
        self._skip = 0

    def _bucket_of(self, sample: Mapping[str, Any]) -> int:
        length, nodes, edges = len(sample["input_ids"]), len(sample["node_features"]), len(sample["edge_index"])
        for index, (max_length, max_nodes, max_edges) in enumerate(self.buckets):
            if length <= max_length and nodes <= max_nodes and edges <= max_edges:
                return index
        return len(self.buckets) - 1  # fits the full row (checked when the sample was built)

    def _make_batches(self, samples: list[dict]) -> list[list[dict]]:
        by_bucket: list[list[dict]] = [[] for _ in self.buckets]
        for sample in samples:
            by_bucket[self._bucket_of(sample)].append(sample)
        batches: list[list[dict]] = []
        carry: list[dict] = []
        size = self.batch_rows
        for index, members in enumerate(by_bucket):
            group = carry + sorted(members, key=lambda s: len(s["input_ids"]))
            full = len(group) // size * size
            last = index == len(self.buckets) - 1
            cut = len(group) if last else full
            length, nodes, edges = self.buckets[index]
            for start in range(0, cut, size):
                batches.append([single_sample_row(s, length, nodes, edges, self.pad_id)
                                for s in group[start:start + size]])
            carry = group[cut:]
        order = np.random.default_rng([self.config.seed, 7919, self._window_index]).permutation(len(batches))
        return [batches[i] for i in order]

    def __next__(self) -> list[dict]:
        while self._batches is None or self._emitted >= len(self._batches):
            if self._batches is not None:  # the window is used up: the next one starts here
                self._window_index += 1
                self._window_state = self._parent.get_state()
            samples = []
            for _ in range(self.window_size):
                try:
                    samples.append(next(self._parent))
                except StopIteration:
                    break
            if not samples:
                self._batches = None
                raise StopIteration
            self._batches = self._make_batches(samples)
            self._emitted = min(self._skip, len(self._batches))
            self._skip = 0
        batch = self._batches[self._emitted]
        self._emitted += 1
        return batch

    def get_state(self) -> dict:
        return {"parent": self._window_state, "window": self._window_index,
                "emitted": self._emitted if self._batches is not None else self._skip}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._window_state = state["parent"]
        self._window_index = int(state["window"])
        self._batches = None
        self._emitted = 0
        self._skip = int(state["emitted"])

"""The task mixture at index level: stream position -> (task index, record index, position), before any record
is read.

Two modes. `concat` is what the public code does: concatenate every task, keeping a seeded random subset of
`ratio` of each (`forward:1/retrosynthesis:0.5`), and reshuffle the whole plan every epoch. `weighted` gives task t
weight_t / sum of the weights, each task reshuffled and repeated on its own (Grain's `MapDataset.mix`). The stream
is then sharded by JAX process: process p of P reads positions p, p + P, ...
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

import grain
import numpy as np

from omnimol_jax.config import DataConfig
from omnimol_jax.data.permutation import EpochPermutations


class _ConcatStream:
    """Concat mode: position -> (task index, record index); the concatenated plan reshuffled every epoch."""

    def __init__(self, task_of: np.ndarray, record_of: np.ndarray, seed: int, shuffle: bool,
                 num_epochs: Optional[int]):
        self.task_of, self.record_of = task_of, record_of
        self.order = EpochPermutations(len(task_of), [seed, 1], shuffle)
        self.length = sys.maxsize if num_epochs is None else num_epochs * len(task_of)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[int, int]:
        j = self.order(index)
        return int(self.task_of[j]), int(self.record_of[j])


class _TaskStream:
    """Weighted mode: one task's records, repeated forever, reshuffled on every pass."""

    def __init__(self, task_index: int, size: int, seed: int, shuffle: bool):
        self.task_index = task_index
        self.order = EpochPermutations(size, [seed, 2, task_index], shuffle)

    def __len__(self) -> int:
        return sys.maxsize

    def __getitem__(self, index: int) -> tuple[int, int]:
        return self.task_index, self.order(index)


def _attach_position(position: int, element: tuple[int, int]) -> tuple[int, int, int]:
    return element[0], element[1], int(position)


def process_shard(config: DataConfig) -> tuple[int, int]:
    if config.process_index is not None:
        return config.process_index, config.process_count
    import jax  # local: the pipeline can be built and tested without touching jax devices

    return jax.process_index(), jax.process_count()


def mixture_dataset(sizes: Sequence[int], values: Sequence[float], config: DataConfig) -> grain.MapDataset:
    """The stream of (task index, record index, stream position), before process sharding."""
    if config.mixture == "concat":
        task_of, record_of = [], []
        for task_index, (size, ratio) in enumerate(zip(sizes, values)):
            keep = size if ratio >= 1.0 else int(round(size * ratio))
            if ratio < 1.0:  # a fixed random subset, drawn once (as the public code's random_split)
                chosen = np.sort(np.random.default_rng([config.seed, 3, task_index]).permutation(size)[:keep])
            else:
                chosen = np.arange(size)
            task_of.append(np.full(keep, task_index, np.int32))
            record_of.append(chosen.astype(np.int64))
        task_of_all, record_of_all = np.concatenate(task_of), np.concatenate(record_of)
        if len(task_of_all) == 0:
            raise ValueError("the mixture selects no records")
        dataset = grain.MapDataset.source(_ConcatStream(task_of_all, record_of_all, config.seed, config.shuffle,
                                                        config.num_epochs))
    else:
        parts = []
        for task_index, size in enumerate(sizes):
            if size == 0:
                raise ValueError(f"task #{task_index} has no records but a weight in the mixture")
            parts.append(grain.MapDataset.source(_TaskStream(task_index, size, config.seed, config.shuffle)))
        dataset = grain.MapDataset.mix(parts, weights=list(values))
        if config.num_epochs is not None:  # as many samples as num_epochs passes over all tasks
            dataset = dataset[: config.num_epochs * int(sum(sizes))]
    return dataset.map_with_index(_attach_position)

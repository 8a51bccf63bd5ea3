"""Seeded per-epoch permutations of a stream's positions (every epoch reshuffled, exactly reproducible).
"""
from __future__ import annotations

import threading
from typing import Sequence

import numpy as np


class EpochPermutations:
    """A seeded permutation of range(size) per epoch (the last few kept), so every epoch is reshuffled.

    Grain's index shuffle costs about a millisecond per element on small sets; one numpy permutation per epoch
    costs ~10 ms per million elements and 8 bytes per element while cached.
    """

    def __init__(self, size: int, seed: Sequence[int], shuffle: bool):
        self.size = size
        self.seed = list(seed)
        self.shuffle = shuffle
        self._cache: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __call__(self, index: int) -> int:
        epoch, offset = divmod(int(index), self.size)
        if not self.shuffle:
            return offset
        permutation = self._cache.get(epoch)
        if permutation is None:
            permutation = np.random.default_rng(self.seed + [epoch]).permutation(self.size)
            with self._lock:
                if len(self._cache) >= 3:
                    self._cache.pop(min(self._cache))
                self._cache[epoch] = permutation
        return int(permutation[offset])

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_cache"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

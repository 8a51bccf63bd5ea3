"""Bad records: what a rejected sample carries, how rejections ride along the stream, and their counts.

A record that cannot become a sample (malformed, a molecule RDKit cannot read, too long, ...) turns into a
`Rejection` in the worker. `AcceptedIterDataset` (in the main process, after any workers) drops it and hangs its
description on the next accepted sample, so each is counted exactly once, when the batch holding that sample
is consumed, and the counts restore exactly with the iterator state.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any, Mapping, Optional, Sequence

import grain

from omnimol_jax.data.readers import REASON_TOO_LONG, REASON_TRUNCATED
from omnimol_jax.errors import InputError

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Rejection:
    task: str
    reason: str
    path: str
    record_index: int
    message: str

    def to_list(self) -> list:
        return [self.task, self.reason, self.path, self.record_index, self.message]


class AcceptedIterDataset(grain.IterDataset):
    """Drops rejected samples; their descriptions ride on the next accepted sample (key 'rejections'), so they
    are counted exactly once, when the batch holding that sample is consumed."""

    def __init__(self, parent: grain.IterDataset, max_consecutive_rejections: int):
        super().__init__(parent)
        self._max_consecutive_rejections = max_consecutive_rejections

    def __iter__(self) -> "AcceptedIterator":
        return AcceptedIterator(self._parent.__iter__(), self._max_consecutive_rejections)


class NoUsableSamplesError(InputError):
    """Every record in a long run was rejected: the data or the limits (seq_len, atom budget) are wrong."""


class AcceptedIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, max_consecutive_rejections: int = 5000):
        super().__init__(parent)
        self._pending: list[list] = []
        self._max_consecutive_rejections = max_consecutive_rejections

    def __next__(self) -> dict:
        while True:
            element = next(self._parent)
            if "_rejected" in element:
                self._pending.append(list(element["_rejected"]))
                if len(self._pending) >= self._max_consecutive_rejections:
                    reasons = collections.Counter((r[0], r[1]) for r in self._pending)
                    example = self._pending[-1]
                    raise NoUsableSamplesError(
                        f"the last {len(self._pending)} records were all rejected "
                        f"({', '.join(f'{task}/{reason}: {n}' for (task, reason), n in reasons.most_common(6))}); "
                        f"e.g. {example[4]}. Check data.seq_len, "
                        "data.nodes_per_row and the data files.")
                continue
            element = dict(element)
            if "_truncated" in element:  # kept, but counted like the skipped records
                self._pending.append(list(element.pop("_truncated")))
            element["rejections"] = self._pending
            self._pending = []
            return element

    def get_state(self) -> dict:
        return {"parent": self._parent.get_state(), "pending": [list(p) for p in self._pending]}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._pending = [list(p) for p in state["pending"]]

    def take_pending(self) -> list[list]:
        """Rejections after the last accepted sample (only left at the end of a finite stream)."""
        pending, self._pending = self._pending, []
        return pending


def find_accepted_iterator(iterator: Any) -> Optional[AcceptedIterator]:
    """The AcceptedIterator inside a Grain iterator chain (it runs in this process, after any workers)."""
    todo = [iterator]
    while todo:
        node = todo.pop()
        if isinstance(node, AcceptedIterator):
            return node
        todo.extend(getattr(node, "_parents", ()))
    return None


class BadRecordStats:
    """Skipped records counted per task and reason, and over-long samples kept truncated (reason 'truncated');
    the first few of each kind are logged."""

    def __init__(self, max_logged: int = 3):
        self.max_logged = max_logged
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, rejection: Sequence[Any]) -> None:
        task, reason, path, record_index, message = rejection
        key = (str(task), str(reason))
        self.counts[key] += 1
        bucket = self.examples.setdefault(f"{task}/{reason}", [])
        if len(bucket) < self.max_logged:
            bucket.append(f"{path} record {record_index}: {message}")
            what = "kept an over-long sample cut" if reason == REASON_TRUNCATED else "skipped a bad record"
            logger.warning("%s (%s, %s): %s record %s: %s", what, task, reason, path, record_index, message)

    @property
    def total(self) -> int:
        """Records skipped (truncated ones were kept, and do not count)."""
        return sum(c for (_, reason), c in self.counts.items() if reason != REASON_TRUNCATED)

    def by_task(self) -> dict[str, dict[str, int]]:
        """{task: {reason: skipped records}} (truncated samples are in `truncated_by_task`)."""
        out: dict[str, dict[str, int]] = {}
        for (task, reason), count in sorted(self.counts.items()):
            if reason != REASON_TRUNCATED:
                out.setdefault(task, {})[reason] = count
        return out

    def truncated_by_task(self) -> dict[str, int]:
        return {task: count for (task, reason), count in sorted(self.counts.items()) if reason == REASON_TRUNCATED}

    def overlong_by_task(self) -> dict[str, int]:
        """Over-long samples per task, whichever data.overlong did with them (rejected or truncated)."""
        out: dict[str, int] = {}
        for (task, reason), count in self.counts.items():
            if reason in (REASON_TOO_LONG, REASON_TRUNCATED):
                out[task] = out.get(task, 0) + count
        return dict(sorted(out.items()))

    def to_dict(self) -> dict:
        return {"counts": [[t, r, c] for (t, r), c in sorted(self.counts.items())], "examples": self.examples}

    def load_dict(self, state: Mapping[str, Any]) -> None:
        self.counts = collections.Counter({(t, r): int(c) for t, r, c in state.get("counts", [])})
        self.examples = {k: list(v) for k, v in state.get("examples", {}).items()}

"""Predictions of a multi-process evaluation: each process appends its share to its own part file beside
predictions.jsonl (`predictions.part-<i>-of-<n>.jsonl`, a PredictionStore each), and process 0 merges the parts
into predictions.jsonl in the order one process would have written them, then deletes them. Parts left by a run
that was stopped count as answered on the next run (whatever its process count) and are merged by it."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from omnimol_jax.eval.report import PredictionStore

PART = re.compile(r"predictions\.part-(\d+)-of-(\d+)\.jsonl")


def part_path(out_dir: Path, index: int, count: int) -> Path:
    return Path(out_dir) / f"predictions.part-{index}-of-{count}.jsonl"


def part_files(out_dir: Path) -> list[Path]:
    return sorted(p for p in Path(out_dir).glob("predictions.part-*.jsonl") if PART.fullmatch(p.name))


class PredictionParts:
    """Every part file in `out_dir`, read (and checked) as PredictionStores."""

    def __init__(self, out_dir: Path):
        self.stores = [PredictionStore(path) for path in part_files(out_dir)]

    def __contains__(self, record_id: str) -> bool:
        return any(record_id in store for store in self.stores)

    def merge_into(self, store: PredictionStore, planned: Sequence[str]) -> int:
        """Appends the parts' records to `store`: those of earlier runs first (in file order), then `planned` (the
        record ids in the order one process generates them); deletes the part files. Returns the records moved."""
        records = {rid: record for part in self.stores for rid, record in part.records.items()}
        planned_set = set(planned)
        earlier = [record for rid, record in records.items() if rid not in planned_set]
        ordered = earlier + [records[rid] for rid in planned if rid in records]
        moved = store.append(ordered)
        for part in self.stores:
            part.path.unlink(missing_ok=True)
        return moved

    def delete(self) -> None:
        for part in self.stores:
            part.path.unlink(missing_ok=True)

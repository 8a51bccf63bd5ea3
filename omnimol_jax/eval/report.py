"""Evaluation outputs, independent of the model: the raw predictions as resumable JSONL, per-task metric
JSON, a Markdown table and a PNG summary.

Predictions file: one JSON object per line with at least 'id' (unique within the file; e.g.
'forward/17'), 'task', 'prediction' and 'reference'. `PredictionStore` reads what is there, tells which
records are still missing, and appends new ones flushed to disk, so an interrupted evaluation resumes
where it stopped. A last line cut off by a crash (no trailing newline, or not valid JSON) is dropped and
trimmed from the file before appending; a bad line anywhere else is an error naming the line.

Results passed to the writers have the shape {task: {protocol: {metric: value}}}, as
`metrics.compute_task_metrics_both` returns per task. NaN (a metric with nothing to average) is written
as null in JSON and as '-' in the table.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from omnimol_jax.errors import InputError
from omnimol_jax.eval.mol_metrics import PROTOCOLS
from omnimol_jax.tasks import METRIC_SETS, TASK_KEYS, get_task

Results = Mapping[str, Mapping[str, Mapping[str, float]]]

COUNT_KEYS = ("n", "n_valid", "n_failed")


# --------------------------------------------------------------------------------------------------
# Predictions JSONL


class PredictionFileError(InputError):
    """A predictions.jsonl line is not a prediction record; names the file and line."""


class PredictionStore:
    """Append-only JSONL of prediction records keyed by 'id', for resumable evaluation."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.records: dict[str, dict] = {}
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        complete_end = len(data)
        if not data.endswith(b"\n") and data:
            # the last line has no newline: a write was cut off; keep it only if it is whole JSON
            tail = lines[-1]
            try:
                json.loads(tail)
                with self.path.open("ab") as handle:
                    handle.write(b"\n")
            except ValueError:
                complete_end = len(data) - len(tail)
                os.truncate(self.path, complete_end)
        for number, raw in enumerate(data[:complete_end].split(b"\n"), start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except ValueError as error:
                raise PredictionFileError(f"{self.path}:{number}: not a JSON record ({error})") from None
            if not isinstance(record, dict) or "id" not in record:
                raise PredictionFileError(f"{self.path}:{number}: a prediction record must be an object with an "
                                          "'id'")
            if not isinstance(record.get("prediction", ""), str):
                raise PredictionFileError(f"{self.path}:{number}: 'prediction' must be a string, got "
                                          f"{type(record['prediction']).__name__} (use --restart to discard the file)")
            key = str(record["id"])
            if key in self.records:
                raise PredictionFileError(f"{self.path}:{number}: record id {key!r} appears twice")
            self.records[key] = record

    def __contains__(self, record_id: Any) -> bool:
        return str(record_id) in self.records

    def __len__(self) -> int:
        return len(self.records)

    def missing(self, record_ids: Iterable[Any]) -> list[str]:
        """The ids (in the given order) that have no stored prediction yet."""
        return [str(r) for r in record_ids if str(r) not in self.records]

    def append(self, records: Sequence[Mapping[str, Any]]) -> int:
        """Writes the records whose id is not stored yet; returns how many were written."""
        fresh = []
        for record in records:
            if "id" not in record:
                raise ValueError(f"prediction record without 'id': {dict(record)!r:.200}")
            key = str(record["id"])
            if key in self.records:
                continue
            if any(key == str(r["id"]) for r in fresh):
                raise ValueError(f"record id {key!r} appears twice in one append")
            fresh.append(dict(record))
        if not fresh:
            return 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            for record in fresh:
                handle.write(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        for record in fresh:
            self.records[str(record["id"])] = record
        return len(fresh)

    def for_task(self, task: str, order: Optional[Sequence[Any]] = None) -> list[dict]:
        """Records of one task, in `order` (ids) when given, else in file order."""
        if order is not None:
            missing = self.missing(order)
            if missing:
                raise KeyError(f"task {task}: {len(missing)} records have no prediction yet (first: {missing[0]!r})")
            return [self.records[str(r)] for r in order]
        return [r for r in self.records.values() if r.get("task") == task]


def read_predictions(path: str | os.PathLike) -> dict[str, dict]:
    """All stored records by id (trims a cut-off last line, like `PredictionStore`)."""
    return dict(PredictionStore(path).records)


# --------------------------------------------------------------------------------------------------
# Metric JSON / Markdown / PNG


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def task_metric_names(task: str, per_protocol: Mapping[str, Mapping[str, float]]) -> list[str]:
    """The task's metric-set columns, then any extra keys the results carry (e.g. r2_BH), sorted."""
    base = list(METRIC_SETS[get_task(base_task(task)).metric_set])
    extra = sorted({k for metrics in per_protocol.values() for k in metrics} - set(base) - set(COUNT_KEYS))
    return base + extra


def write_task_json(out_dir: str | os.PathLike, task: str, per_protocol: Mapping[str, Mapping[str, float]],
                    conventions: Optional[Mapping[str, str]] = None) -> Path:
    """<out_dir>/<task>.json: {"task", "metric_set", "protocols": {protocol: {metric: value}}, "conventions":
    {protocol or topic: how it was scored}}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"task": task, "metric_set": get_task(base_task(task)).metric_set,
               "protocols": {p: {k: _json_value(v) for k, v in m.items()} for p, m in per_protocol.items()}}
    if conventions:
        payload["conventions"] = dict(conventions)
    path = out / f"{task}.json"
    path.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


def _format(value: Optional[float]) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, int):
        return str(value)
    magnitude = abs(value)
    return f"{value:.4f}" if magnitude >= 1e-3 or magnitude == 0 else f"{value:.2e}"


def base_task(name: str) -> str:
    """'weight (train-mean baseline)' -> 'weight': rows derived from a task share its metric set."""
    return name.split(" (", 1)[0]


def _ordered_tasks(results: Results) -> list[str]:
    ordered = []
    for task in TASK_KEYS:  # registry order, each task followed by its derived rows (baselines)
        ordered += [t for t in [task] + sorted(r for r in results if r != task and base_task(r) == task)
                    if t in results]
    return ordered + sorted(t for t in results if t not in ordered)


def markdown_table(results: Results, conventions: Optional[Mapping[str, str]] = None) -> str:
    """One table per metric set (tasks sharing the same columns), one row per task; a cell reads
    'reference / strict' when both protocols are present. `conventions` ({protocol or topic: sentence}) head the
    report."""
    protocols = [p for p in PROTOCOLS if any(p in per for per in results.values())]
    by_set: dict[str, list[str]] = {}
    for task in _ordered_tasks(results):
        by_set.setdefault(get_task(base_task(task)).metric_set, []).append(task)
    header = " / ".join(protocols)
    notes = "".join(f"- **{topic}**: {text}\n" for topic, text in (conventions or {}).items())
    sections = [f"# Evaluation results\n\nCells: {header}.\n" + (f"\n{notes}" if notes else "")]
    for metric_set, tasks in by_set.items():
        columns: list[str] = []
        for task in tasks:
            for name in task_metric_names(task, results[task]):
                if name not in columns:
                    columns.append(name)
        lines = [f"## {metric_set}\n", "| task | n | n_failed | " + " | ".join(columns) + " |",
                 "|" + "---|" * (len(columns) + 3)]
        for task in tasks:
            per = results[task]
            first = per[protocols[0]] if protocols[0] in per else next(iter(per.values()))
            failed = " / ".join(_format(per[p].get("n_failed")) if p in per else "-" for p in protocols)
            cells = [" / ".join(_format(per[p].get(c)) if p in per else "-" for p in protocols) for c in columns]
            lines.append(f"| {task} | {_format(first.get('n'))} | {failed} | " + " | ".join(cells) + " |")
        sections.append("\n".join(lines) + "\n")
    return "\n".join(sections)


def plot_summary(results: Results, path: str | os.PathLike) -> Path:
    """A PNG with one panel per task: grouped bars, one group per metric, one bar per protocol."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = _ordered_tasks(results)
    columns = 4
    rows = max(1, math.ceil(len(tasks) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), squeeze=False)
    colors = {"reference": "#4C72B0", "strict": "#DD8452"}
    for axis in axes.flat[len(tasks):]:
        axis.axis("off")
    for axis, task in zip(axes.flat, tasks):
        per = results[task]
        names = task_metric_names(task, per)
        present = [p for p in PROTOCOLS if p in per]
        width = 0.8 / max(1, len(present))
        # Edit distances and MAEs are unbounded; next to 0-1 scores they go on their own (hatched, right) axis
        # so that the scores stay readable.
        unbounded = {i for i, name in enumerate(names) if "levenshtein" in name or name.startswith("mae")}
        right = axis.twinx() if unbounded and len(unbounded) < len(names) else None
        for k, protocol in enumerate(present):
            raw = [per[protocol].get(name) for name in names]
            missing = [v is None or not math.isfinite(v) for v in raw]
            values = [0.0 if gone else v for v, gone in zip(raw, missing)]
            positions = [i + (k - (len(present) - 1) / 2) * width for i in range(len(names))]
            for i, (x, value) in enumerate(zip(positions, values)):
                target = right if right is not None and i in unbounded else axis
                target.bar([x], [value], width=width, label=protocol if i == 0 else None,
                           color=colors.get(protocol), hatch="//" if target is right else None)
            for x, gone in zip(positions, missing):
                if gone:  # nothing to average (e.g. no valid prediction): say so instead of a 0 bar
                    axis.text(x, 0, "n/a", ha="center", va="bottom", fontsize=6, rotation=90)
        if right is not None:
            axis.set_ylim(0, 1.05)
            right.set_ylabel(" / ".join(names[i] for i in sorted(unbounded)) + " (hatched)", fontsize=7)
            right.tick_params(axis="y", labelsize=7)
        axis.set_title(f"{task} (n={_format(next(iter(per.values())).get('n'))})", fontsize=9)
        axis.set_xticks(range(len(names)))
        axis.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
        axis.tick_params(axis="y", labelsize=7)
    if tasks:
        handles, labels = axes.flat[0].get_legend_handles_labels()
        figure.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=8)
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (3.0 * rows)))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def write_report(results: Results, out_dir: str | os.PathLike,
                 conventions: Optional[Mapping[str, str]] = None) -> dict[str, Path]:
    """Writes <out_dir>/metrics/<task>.json, <out_dir>/metrics.md and <out_dir>/summary.png; `conventions`
    ({protocol or topic: sentence}) say how answers were read and scored, in the table's header and every JSON."""
    out = Path(out_dir)
    paths: dict[str, Path] = {}
    for task in _ordered_tasks(results):
        paths[f"json:{task}"] = write_task_json(out / "metrics", task, results[task], conventions)
    table = out / "metrics.md"
    table.parent.mkdir(parents=True, exist_ok=True)
    table.write_text(markdown_table(results, conventions), encoding="utf-8")
    paths["markdown"] = table
    paths["png"] = plot_summary(results, out / "summary.png")
    return paths

"""Trivial answers every model must beat, scored like the model's predictions on the same test records."""
from __future__ import annotations

from typing import Sequence

from omnimol_jax.data import readers
from omnimol_jax.eval.answers import EOT
from omnimol_jax.eval.metrics import compute_metrics_from_records
from omnimol_jax.eval.number_metrics import homolumo_property, number_in_text_parser
from omnimol_jax.tasks import get_task

BASELINE_SUFFIX = " (train-mean baseline)"


def train_mean_baselines(results: dict, store, task_ids: dict[str, list[str]], data_dir: str, layout: str,
                         protocols: Sequence[str], tokenize_fn) -> dict:
    """For number-output tasks, the metrics of always answering the training split's mean (per homolumo
    property), scored on the same test records: the bar a model must clear to have learned anything."""
    baselines = {}
    for task in results:
        if not get_task(task).answers_number or task == "yield":
            continue
        try:
            train = readers.open_task(data_dir, task, "train", layout)
        except (FileNotFoundError, KeyError):
            continue
        parse = number_in_text_parser(task, "strict")
        values: dict[str, list[float]] = {}
        for i in range(len(train)):
            record = train[i]
            value = parse(record.get("output"))
            if value is not None:
                key = homolumo_property(record.get("instruction", ""), str(i)) if task == "homolumo" else ""
                values.setdefault(key, []).append(value)
        if not values:
            continue
        means = {key: sum(v) / len(v) for key, v in values.items()}
        records = []
        for record in store.for_task(task, order=[i for i in task_ids[task] if i in store]):
            key = homolumo_property(record.get("instruction", ""), record["id"]) if task == "homolumo" else ""
            if key in means:
                answer = f"{means[key]:.6g}"
                records.append(dict(record, prediction=answer, raw=answer + EOT, predictions=None))
        if records:
            baselines[task + BASELINE_SUFFIX] = compute_metrics_from_records(
                task, [{k: v for k, v in r.items() if k != "predictions"} for r in records], protocols,
                tokenize_fn=tokenize_fn)
    return baselines

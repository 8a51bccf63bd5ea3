"""Trivial answers every model must beat, scored like the model's predictions on the same test records."""
from __future__ import annotations

from collections import Counter
from typing import Callable, Sequence

from omnimol_jax.data import readers
from omnimol_jax.eval.answers import EOT
from omnimol_jax.eval.metrics import compute_metrics_from_records
from omnimol_jax.eval.number_metrics import homolumo_property, number_in_text_parser
from omnimol_jax.tasks import get_task

BASELINE_SUFFIX = " (train-mean baseline)"
FREQUENT_SUFFIX = " (most-frequent baseline)"
COPY_SUFFIX = " (copy-input baseline)"
# Tasks whose input is a molecule close to the answer: copying it is the trivial guess to beat.
COPY_INPUT_TASKS = ("forward", "retrosynthesis", "molediting")


def _scored(task: str, records: list[dict], answer_of: Callable[[dict], str], protocols, tokenize_fn,
            end_of_turn: str = EOT) -> dict:
    """The metrics of answering each record with answer_of(record), as a model's clean answer would be read."""
    answered = []
    for record in records:
        answer = answer_of(record)
        answered.append({**{k: v for k, v in record.items() if k not in ("predictions", "scores")},
                         "prediction": answer, "raw": answer + end_of_turn, "finished": True})
    return compute_metrics_from_records(task, answered, protocols, tokenize_fn=tokenize_fn, end_of_turn=end_of_turn)


def answer_baselines(results: dict, store, task_ids: dict[str, list[str]], data_dir: str, layout: str,
                     protocols: Sequence[str], tokenize_fn, end_of_turn: str = EOT) -> dict:
    """For molecule and text tasks: the metrics of always giving the training split's most frequent answer, and
    (forward, retrosynthesis, molecule editing) of copying the input molecule, on the same test records. A reader
    sees at once whether the model beats the trivial answer."""
    baselines = {}
    for task in [t for t in results if t in task_ids]:
        if get_task(task).answers_number:
            continue
        records = store.for_task(task, order=[i for i in task_ids[task] if i in store])
        if not records:
            continue
        try:
            train = readers.open_task(data_dir, task, "train", layout)
        except (FileNotFoundError, KeyError):
            train = None
        if train is not None and len(train):
            counts = Counter(str(train[i].get("output", "")).strip() for i in range(len(train)))
            frequent = counts.most_common(1)[0][0]
            baselines[task + FREQUENT_SUFFIX] = _scored(task, records, lambda _: frequent, protocols, tokenize_fn,
                                                        end_of_turn)
        if task in COPY_INPUT_TASKS:
            test = readers.open_task(data_dir, task, "test", layout)
            inputs = {task_ids[task][i]: str(test[i].get("input", "")).strip() for i in range(len(task_ids[task]))}
            baselines[task + COPY_SUFFIX] = _scored(task, records, lambda r: inputs[r["id"]], protocols,
                                                    tokenize_fn, end_of_turn)
    return baselines


def train_mean_baselines(results: dict, store, task_ids: dict[str, list[str]], data_dir: str, layout: str,
                         protocols: Sequence[str], tokenize_fn, end_of_turn: str = EOT) -> dict:
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
        means = {key: f"{sum(v) / len(v):.6g}" for key, v in values.items()}

        def property_of(record: dict) -> str:
            return homolumo_property(record.get("instruction", ""), record["id"]) if task == "homolumo" else ""

        records = [r for r in store.for_task(task, order=[i for i in task_ids[task] if i in store])
                   if property_of(r) in means]
        if records:
            baselines[task + BASELINE_SUFFIX] = _scored(task, records, lambda r: means[property_of(r)], protocols,
                                                        tokenize_fn, end_of_turn)
    return baselines

"""Time of the metric stage of `omnimol eval` on the built-in test split (both protocols, every task).

    python benchmarks/eval_metrics.py [--data data/builtin] [--repeats 3]

Stand-in answers: each test record is answered with the reference of another record of the same task (a fixed
shuffle), so every metric does real work: molecules parse and get fingerprinted, numbers parse, texts are
tokenized (the built-in tokenizer's pieces, as `omnimol eval` does) and scored by BLEU, METEOR and ROUGE. The raw
answer is the same text closed by `<|eot_id|>`, as a model that stopped would give. Prints one JSON object: the
time of the first pass (which pays one-time loads: WordNet, libraries) and the best of `--repeats` later passes,
overall and per task, each pass starting with empty caches.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import tokenizers
from machine import describe_machine  # benchmarks/machine.py (the script folder is on sys.path)

from omnimol_jax.data import readers
from omnimol_jax.eval.metrics import compute_metrics_from_records


def stand_in_records(data_dir: str, task: str) -> list[dict]:
    source = readers.open_task(data_dir, task, "test")
    records = [source[i] for i in range(len(source))]
    answers = [str(r["output"]) for r in records]
    random.Random(0).shuffle(answers)
    return [{"id": f"{task}/{i}", "prediction": answer, "raw": answer + "<|eot_id|>", "reference": r["output"],
             "instruction": r.get("instruction", "")} for i, (r, answer) in enumerate(zip(records, answers))]


def clear_caches() -> None:
    """Per-run caches (fingerprints) start empty in every timed pass, as in one `omnimol eval` run."""
    from omnimol_jax.eval import mol_metrics

    getattr(mol_metrics, "_FINGERPRINTS", {}).clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="data/builtin")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tokenizer = tokenizers.Tokenizer.from_file(str(Path(args.data) / "tokenizer" / "tokenizer.json"))

    def pieces(text: str) -> list[str]:
        return tokenizer.encode(text, add_special_tokens=False).tokens

    tasks = {task: stand_in_records(args.data, task) for task in readers.available_tasks(args.data)}
    tasks = {task: records for task, records in tasks.items() if records}
    first_call_s = time.perf_counter()
    for task, records in tasks.items():  # the first pass also pays one-time loads (WordNet, libraries)
        compute_metrics_from_records(task, records, tokenize_fn=pieces)
    first_call_s = time.perf_counter() - first_call_s
    per_task = {task: float("inf") for task in tasks}
    for _ in range(args.repeats):
        for task, records in tasks.items():
            clear_caches()
            start = time.perf_counter()
            compute_metrics_from_records(task, records, tokenize_fn=pieces)
            per_task[task] = min(per_task[task], time.perf_counter() - start)
    total = sum(per_task.values())
    count = sum(len(r) for r in tasks.values())
    print(json.dumps({
        "benchmark": "eval_metrics", "records": count, "first_pass_s": round(first_call_s, 3),
        "best_pass_s": round(total, 3), "records_per_s": round(count / total, 1),
        "per_task_s": {task: round(s, 4) for task, s in per_task.items()},
        "per_task_records": {task: len(r) for task, r in tasks.items()},
        "machine": describe_machine(),
    }, indent=1))


if __name__ == "__main__":
    main()

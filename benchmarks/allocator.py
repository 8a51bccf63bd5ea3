"""The demo train step with glibc's malloc against mimalloc with freed pages kept (omnimol_jax/allocator.py).

    python benchmarks/allocator.py [--steps 14] [--repeats 2]

Runs `omnimol train --config configs/demo.yaml` for a few steps in fresh processes, alternating
OMNIMOL_ALLOCATOR=system and the default (mimalloc), and reads each step's time from metrics.jsonl (steps after
the third, so compilation and warm-up are left out). Also counts the minor page faults of each whole run. Prints
one JSON object: median step time per allocator and the speed-up of mimalloc over glibc, measured in this run.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import describe_machine  # benchmarks/machine.py (the script folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]


def run_demo(allocator: str, steps: int, out_dir: Path) -> dict:
    env = {**os.environ, "OMNIMOL_ALLOCATOR": allocator}
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "omnimol_jax.cli", "train", "--config", str(REPO / "configs" / "demo.yaml"),
                    f"train.max_steps={steps}", "train.log_every=1", "train.eval_every=0",
                    f"train.checkpoint_every={steps}", f"train.output_dir={out_dir}", "--no-progress"],
                   check=True, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - start
    faults = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt - before
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_time_s"] for r in rows if r.get("kind") == "train" and r["step"] > 3 and "step_time_s" in r]
    return {"step_times_s": times, "minor_page_faults": faults, "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    results: dict[str, list[dict]] = {"system": [], "mimalloc": []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for allocator in results:  # alternate, so load on the machine hits both alike
                results[allocator].append(run_demo(allocator, args.steps, Path(tmp) / f"{allocator}{repeat}"))
    summary = {}
    for allocator, runs in results.items():
        times = [t for run in runs for t in run["step_times_s"]]
        summary[allocator] = {"median_step_s": round(statistics.median(times), 4), "steps_timed": len(times),
                              "minor_page_faults_per_run": [run["minor_page_faults"] for run in runs],
                              "wall_s_per_run": [round(run["wall_s"], 1) for run in runs]}
    speedup = summary["system"]["median_step_s"] / summary["mimalloc"]["median_step_s"]
    print(json.dumps({"benchmark": "allocator", "config": "configs/demo.yaml", **summary,
                      "mimalloc_speedup_over_glibc": round(speedup, 3), "machine": describe_machine()}, indent=1))


if __name__ == "__main__":
    main()

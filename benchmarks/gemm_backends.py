"""A run's train step under XLA:CPU's GEMM back-ends: the default (Eigen), oneDNN and XNNPACK.

    python benchmarks/gemm_backends.py [--config configs/demo.yaml] [--steps 10] [--repeats 2] [key=value ...]

Runs `omnimol train --config C` for a few steps in fresh processes, one per back-end and taking turns (so the
machine's background load hits all alike), with XLA_FLAGS set to `--xla_cpu_use_onednn=true`,
`--xla_cpu_use_xnnpack=true` or neither, and reads each step's time from metrics.jsonl (steps after the second, so
compilation and warm-up are left out). Also reports each back-end's losses, which must agree to fp32 rounding.
Prints one JSON object: median step time per back-end and the speed-up of each over the default, measured in this run.
`omnimol` itself sets the flag that `OMNIMOL_GEMM` names (omnimol_jax/allocator.py); this benchmark sets
OMNIMOL_GEMM=default and passes the flags itself, so that it measures the back-ends and not the setting.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import describe_machine  # benchmarks/machine.py (the script folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
BACKENDS = {"default": "", "onednn": "--xla_cpu_use_onednn=true", "xnnpack": "--xla_cpu_use_xnnpack=true"}


def run_steps(config: str, flags: str, steps: int, out_dir: Path, overrides: list[str]) -> dict:
    env = {**os.environ, "OMNIMOL_GEMM": "default",
           "XLA_FLAGS": " ".join(f for f in (os.environ.get("XLA_FLAGS", ""), flags) if f)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "omnimol_jax.cli", "train", "--config", config, "--no-progress",
                    f"train.max_steps={steps}", "train.log_every=1", "train.eval_every=0", "train.export_final=false",
                    f"train.checkpoint_every={steps}", f"train.output_dir={out_dir}", *overrides],
                   check=True, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("kind") == "train"]
    return {"step_times_s": [r["step_time_s"] for r in train if r["step"] > 2 and "step_time_s" in r],
            "losses": [r["loss"] for r in train], "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help="comma-separated subset of " + ",".join(BACKENDS))
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    chosen = [b.strip() for b in args.backends.split(",") if b.strip()]
    results: dict[str, list[dict]] = {name: [] for name in chosen}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for name in chosen:  # take turns
                results[name].append(run_steps(args.config, BACKENDS[name], args.steps,
                                               Path(tmp) / f"{name}{repeat}", args.overrides))
    summary = {}
    for name, runs in results.items():
        times = [t for run in runs for t in run["step_times_s"]]
        summary[name] = {"median_step_s": round(statistics.median(times), 4), "steps_timed": len(times),
                         "wall_s_per_run": [round(run["wall_s"], 1) for run in runs],
                         "losses_first_run": [round(x, 5) for x in runs[0]["losses"]]}
    base = summary.get("default", {}).get("median_step_s")
    speedups = {name: round(base / s["median_step_s"], 3) for name, s in summary.items() if base and name != "default"}
    print(json.dumps({"benchmark": "gemm_backends", "config": args.config, "overrides": args.overrides, **summary,
                      "speedup_over_default": speedups, "machine": describe_machine()}, indent=1))


if __name__ == "__main__":
    main()

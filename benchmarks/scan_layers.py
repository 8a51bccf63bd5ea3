"""Scanned vs unrolled decoder layers: compile time of the trainer's step against depth, and step time.

    python benchmarks/scan_layers.py [--depths 4 8 16] [--batch 4 --seq 256 --iters 3] [--remat POLICY]
The paper's stage-2 recipe (frozen backbone, LoRA r=64 + MoGE on the last quarter of the layers, 5 experts + 1
shared, top-2, remat `--remat`) at the `small` preset's widths, with `--depths` decoder layers. For each depth the
trainer's step function is compiled with `model.scan_layers` off and on (compile seconds, FLOPs with the loops
counted, XLA's temporaries), then both steps run interleaved (min and median). Prints one JSON object.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import numpy as np
from machine import describe_machine  # benchmarks/machine.py (the script folder is on sys.path)
from train_step import ours  # the trainer's step function on a text batch, compiled

from omnimol_jax.config import LoRAConfig, MoGEConfig, model_config_from_preset


def recipe(depth: int, remat: str, scan: bool):
    base = model_config_from_preset("small", num_layers=depth, remat_policy=remat, scan_layers=scan)
    return dataclasses.replace(base, lora=LoRAConfig(enabled=True, rank=64, dropout=0.05, gal=True),
                               moge=MoGEConfig(enabled=True, layers="last_quarter", num_experts=5,
                                               num_shared_experts=1, top_k=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--remat", default="dots_with_no_batch_dims")
    args = parser.parse_args()

    rows = []
    for depth in args.depths:
        ids = np.random.default_rng(0).integers(3, 32768, (args.batch, args.seq)).astype(np.int32)
        facts, runs = {}, {}
        for scan in (False, True):
            name = "scanned" if scan else "unrolled"
            facts[name], runs[name], _ = ours(recipe(depth, args.remat, scan), ids)
        times: dict[str, list[float]] = {name: [] for name in runs}
        losses = {}
        for _ in range(args.iters):  # interleaved: each round times both once
            for name, run in runs.items():
                start = time.perf_counter()
                losses[name] = run()
                times[name].append(time.perf_counter() - start)
        row = {"layers": depth}
        for name in runs:
            row[name] = {"compile_s": facts[name]["compile_s"], "flops_per_step": facts[name]["flops_per_step"],
                         "temp_bytes": facts[name]["temp_bytes"], "step_s_min": round(min(times[name]), 4),
                         "step_s_median": round(statistics.median(times[name]), 4), "loss": losses[name]}
        row["compile_scanned_over_unrolled"] = round(row["scanned"]["compile_s"] / row["unrolled"]["compile_s"], 3)
        row["step_scanned_over_unrolled_median"] = round(row["scanned"]["step_s_median"]
                                                         / row["unrolled"]["step_s_median"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps({"benchmark": "scan_layers", "preset": "small", "batch": args.batch, "seq_len": args.seq,
                      "remat_policy": args.remat, "recipe": "stage 2: LoRA r64 + MoGE last_quarter E5+1 k2",
                      "depths": rows, "machine": describe_machine()}, indent=2))


if __name__ == "__main__":
    main()

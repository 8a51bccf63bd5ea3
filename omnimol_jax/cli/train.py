"""`omnimol train --config configs/<name>.yaml [key=value ...]`, e.g. `init.hf=DIR train.profile_steps=10:15`, and
`omnimol inspect-data --config C [--task T] [-n 3] [--json]`: the samples that run would train on."""
from __future__ import annotations

import argparse
import logging


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train stage 1 (projector) or stage 2 (MoGE SFT)",
        description="Trains under jax.jit shardings over the configured mesh, with Orbax checkpoints (resume "
                    "by running the same command again; the config is checked against the checkpoints' own, and a "
                    "finished run reports that it is complete), TensorBoard scalars, a JSONL log and end-of-run "
                    "plots. "
                    "Any config key can be overridden as key=value, e.g. train.max_steps=100 "
                    "init.hf=/models/Llama-3.2-1B-Instruct train.profile_steps=10:15.")
    p.add_argument("--config", required=True, help="run config YAML, e.g. configs/demo.yaml")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() first (multi-host: TPU pods, SLURM, Kubernetes, or "
                        "JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID set by hand)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=_train)

    p = subparsers.add_parser(
        "inspect-data", help="print the first records of each task as training renders them",
        description="Builds each record as `omnimol train --config C` would (the backbone's tokenizer and chat "
                    "format, the task's template, the graph slots, the labels) and prints its text with the "
                    "supervised span between \u00ab \u00bb and the graph as <graph: N atoms>, then the token counts; "
                    "with --json one JSON object per record with the ids and labels (-200: graph slot, -100: no "
                    "loss).")
    p.add_argument("--config", required=True, help="run config YAML, e.g. configs/smollm2_stage2.yaml")
    p.add_argument("--task", action="append", default=None, help="only this task (repeatable; default: every task)")
    p.add_argument("-n", type=int, default=3, help="records per task (default 3, the first in the file)")
    p.add_argument("--json", action="store_true", help="JSON lines with ids and labels instead of text")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=_inspect_data)


def _train(args) -> int:
    from omnimol_jax.config import load_config
    from omnimol_jax.train.trainer import Trainer

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.distributed:
        from omnimol_jax.multihost import initialize_distributed

        initialize_distributed()
    config = load_config(args.config, args.overrides)
    result = Trainer(config, progress=not args.no_progress).run()
    out = result.output_dir
    if result.stopped_by == "already_complete":
        print(f"already complete at step {result.final_step}; model: {out / 'final'}")
        return 0
    print(f"stopped at step {result.final_step} ({result.stopped_by}); run directory: {out}")
    print(f"  checkpoints: {out / 'checkpoints'}   logs: {out / 'metrics.jsonl'}, {out / 'tensorboard'}")
    print(f"  plots: {out / 'loss_per_task.png'}" + (f", {out / 'expert_usage.png'}"
                                                      if (out / 'expert_usage.png').exists() else ""))
    if (out / "final").exists():
        print(f"  model: {out / 'final'}")
    if result.stopped_by == "signal":  # after its checkpoint; the shell convention for death by that signal
        return 128 + (result.signal or 15)
    return 0 if result.stopped_by != "nonfinite" else 3


def _inspect_data(args) -> int:
    import dataclasses
    import json

    from omnimol_jax.config import load_config
    from omnimol_jax.train.inspect_data import inspect_samples, marked_text

    if args.n < 1:
        from omnimol_jax.errors import InputError
        raise InputError(f"-n must be >= 1, got {args.n}")
    config = load_config(args.config, args.overrides)
    tokenizer, samples = inspect_samples(config, args.task, args.n)
    if not args.json:
        print(f"# tokenizer {tokenizer.source} (chat format {tokenizer.frame.name}, end of turn "
              f"{tokenizer.end_of_turn!r}); supervised text between \u00ab \u00bb")
    for sample in samples:
        if args.json:
            print(json.dumps({**dataclasses.asdict(sample), "supervised": sample.supervised}))
            continue
        print(f"\n=== {sample.task}: {sample.file} record {sample.record}")
        if sample.rejected:
            print(f"(training skips it: {sample.rejected})")
            continue
        print(marked_text(sample, tokenizer))
        print(f"--- {len(sample.input_ids)} tokens: {sample.supervised} supervised, {sample.num_atoms} graph slots "
              f"({sample.num_bonds // 2} bonds)")
    return 0

"""`omnimol generate` (one answer for one input) and `omnimol eval` (batched generation over test splits, metrics
in both protocols, report): argument parsing; the work is `omnimol_jax.eval.runner` and
`omnimol_jax.inference.session`."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Optional

from omnimol_jax.errors import InputError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="omnimol model checkpoint directory (omnimol init / train)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json or a folder holding one (default: <checkpoint>/hf_assets)")
    p.add_argument("--single-bos", action="store_true", default=None,
                   help="one BOS token (default: what the checkpoint was trained with, else two as the public "
                        "code and released checkpoints)")
    p.add_argument("--mesh", default=None, metavar="AXIS=SIZE,...",
                   help="device mesh, e.g. data=-1 or data=2,tensor=4 (default: one device)")


def _add_decoding_args(p: argparse.ArgumentParser, default_max_new: int) -> None:
    group = p.add_argument_group("decoding (default: greedy)")
    group.add_argument("--greedy", action="store_true", help="argmax decoding (the default)")
    group.add_argument("--temperature", type=float, default=None, help="sample at this temperature (> 0)")
    group.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature)")
    group.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (with --temperature)")
    group.add_argument("--seed", type=int, default=0, help="sampling seed")
    group.add_argument("--beams", type=int, default=1, help="beam search with K beams (returns the K best)")
    group.add_argument("--length-penalty", type=float, default=0.0,
                       help="beam score = sum log p / length ** penalty (default 0: the plain sum)")
    group.add_argument("--constrained", action="store_true",
                       help="molecule-output tasks: only tokens that keep the answer a SELFIES sequence")
    group.add_argument("--max-new-tokens", type=int, default=default_max_new)
    group.add_argument("--number-median", type=int, default=0, metavar="K",
                       help="number tasks: answer each number with the median of the model's distribution (the "
                            "MAE-optimal answer), found by enumerating up to K integer-part prefixes per step "
                            "instead of greedy's digit-by-digit mode; deterministic; 0 = off (16 is a good K)")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate", help="answer one task input, or a free prompt, with a checkpoint",
        description="With --task/--input: builds the task's prompt exactly as training does (template, chat "
                    "format, graph of the input molecule per the task's rule). With --prompt: one user turn in the "
                    "checkpoint tokenizer's chat format, for any checkpoint, a plain language model (import-hf "
                    "--hf/--gguf) included. Prints the answer; with --beams K, K lines 'score<TAB>answer', best "
                    "first.")
    _add_model_args(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--task", help="task key, e.g. forward, retrosynthesis, logp, molcap (with --input)")
    what.add_argument("--prompt", help="a free user message, sent through the chat template")
    p.add_argument("--input", help="the record's input (SELFIES, reaction, name or text), with --task")
    p.add_argument("--system", default=None,
                   help="with --prompt: the system message (default: the one training uses, docs/omnimol.md §5)")
    p.add_argument("--instruction", default=None,
                   help="the instruction (default: a standard one for the task where there is one)")
    p.add_argument("--extracted-molecules", default=None,
                   help="experiment task: JSON object {SMILES: '$n$'} naming the input's molecules")
    _add_decoding_args(p, default_max_new=256)
    p.set_defaults(func=run_generate)

    p = subparsers.add_parser(
        "eval", help="generate on test splits and compute the task metrics (both protocols)",
        description="Reads the test split of each task in --data, generates batched with a progress bar, "
                    "appends raw predictions to <out>/predictions.jsonl (a rerun resumes from it), computes "
                    "the metrics of docs/omnimol.md §6 and writes per-task JSON, metrics.md and summary.png.")
    _add_model_args(p)
    p.add_argument("--data", required=True, help="folder with the task files (Omni-Mol release or build-data)")
    p.add_argument("--layout", default="omnimol", choices=("omnimol", "mol_instructions"))
    p.add_argument("--tasks", default="all",
                   help="comma-separated task keys, or 'all' (every task with a file in --data)")
    p.add_argument("--protocol", default="both", choices=("reference", "strict", "both"))
    p.add_argument("--out", default=None, help="output folder (default: eval/<checkpoint name>)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generation batch")
    p.add_argument("--limit", type=int, default=None, help="at most N test records per task (the first N)")
    p.add_argument("--restart", action="store_true", help="discard predictions already in --out")
    p.add_argument("--distributed", action="store_true",
                   help="one of several processes (hosts of a pod; the environment of `train --distributed`): each "
                        "answers its share of the batches on its own devices, process 0 merges the predictions "
                        "(the same as one process would write) and scores; --out must be on storage all can read")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--mbr-samples", type=int, default=0, metavar="N",
                   help="number tasks: draw N samples (at --temperature, default 1.0) and answer with the one "
                        "closest to the others in absolute difference, the MAE-optimal choice (a median "
                        "sample) instead of greedy's leading-digit mode; 0 = off")
    _add_decoding_args(p, default_max_new=512)
    p.set_defaults(func=run_eval)


def generation_config(args: argparse.Namespace):
    from omnimol_jax.inference.decoding import GenerationConfig

    if args.greedy and (args.temperature or args.beams > 1):
        raise UsageError("--greedy excludes --temperature and --beams")
    if args.temperature is not None and args.temperature <= 0:
        raise UsageError("--temperature must be > 0 (leave it out for greedy decoding)")
    if args.temperature is not None and args.beams > 1:
        raise UsageError("beam search is deterministic: use --temperature or --beams, not both")
    if args.number_median < 0:
        raise UsageError(f"--number-median must be 0 (off) or a number of prefixes >= 1, got {args.number_median}")
    if args.number_median and (args.temperature is not None or args.beams > 1 or args.greedy):
        raise UsageError("--number-median is its own deterministic decoding: it excludes --temperature, --beams "
                        "and --greedy")
    try:
        return GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature or 0.0,
                                top_p=args.top_p, top_k=args.top_k, num_beams=args.beams,
                                length_penalty=args.length_penalty, seed=args.seed)
    except ValueError as err:
        raise UsageError(str(err)) from None




class UsageError(InputError):
    """Flags that contradict each other or are out of range."""


def _mesh(text: Optional[str]):
    from omnimol_jax.config import mesh_config_from_text

    return mesh_config_from_text(text) if text else None


def run_generate(args: argparse.Namespace) -> int:
    from omnimol_jax import tasks
    from omnimol_jax.data.prompts import prompt_ids
    from omnimol_jax.inference.session import load_session, number_median_decoder, record_seed

    config = generation_config(args)
    if args.prompt is not None:
        return _generate_from_prompt(args, config)
    if args.input is None:
        raise UsageError("--task needs --input (the record's input)")
    spec = tasks.get_task(args.task)
    record: dict[str, Any] = {"input": args.input}
    if not spec.question_pool:
        instruction = args.instruction or tasks.default_instruction(spec.key)
        if instruction is None:
            raise UsageError(f"task {spec.key!r} has no standard instruction; pass --instruction")
        record["instruction"] = instruction
    if "extracted_molecules" in spec.extra_fields:
        if not args.extracted_molecules:
            raise UsageError(f"task {spec.key!r} needs --extracted-molecules '{{\"SMILES\": \"$1$\"}}'")
        try:
            record["extracted_molecules"] = json.loads(args.extracted_molecules)
        except json.JSONDecodeError as err:
            raise UsageError(f"--extracted-molecules is not JSON: {err}") from None
    constrained = args.constrained and spec.output_type == tasks.OUTPUT_SELFIES
    if args.constrained and not constrained:
        print(f"note: --constrained applies to molecule-output tasks only; {spec.key} answers "
              f"{spec.output_type}", file=sys.stderr)
    session = load_session(args.checkpoint, args.tokenizer, double_bos=False if args.single_bos else None,
                           mesh_config=_mesh(args.mesh), constrained=constrained)
    spec = session.task_view(spec)  # text only for a plain language model or one trained without graph tokens
    try:
        ids, graph = prompt_ids(spec, record, session.tokenizer, session.feature_mode)
    except ValueError as err:
        raise UsageError(f"input {args.input!r} for task {spec.key}: {err}") from None
    if args.number_median and spec.answers_number:
        answer = number_median_decoder(session, args.number_median).generate(
            [ids], [graph], max_new_tokens=config.max_new_tokens)[0]
        print(session.decode(answer.ids))
        return 0
    if args.number_median:
        print(f"note: --number-median applies to number-output tasks only; {spec.key} answers "
              f"{spec.output_type}", file=sys.stderr)
    _print_answers(session, session.generator.generate([ids], config, [graph],
                                                       row_seeds=[record_seed(config.seed, "generate")],
                                                       constrained=constrained), config)
    return 0


def _generate_from_prompt(args: argparse.Namespace, config) -> int:
    """`omnimol generate --prompt TEXT`: one user turn through the tokenizer's chat format."""
    from omnimol_jax.constants import IMAGE_PLACEHOLDER
    from omnimol_jax.inference.session import load_session, record_seed

    if args.input is not None or args.instruction or args.extracted_molecules:
        raise UsageError("--prompt is the whole user message: --input, --instruction and --extracted-molecules "
                         "go with --task")
    if args.constrained or args.number_median:
        raise UsageError("--constrained and --number-median are task decodings: use them with --task")
    if IMAGE_PLACEHOLDER in args.prompt:
        raise UsageError(f"--prompt holds {IMAGE_PLACEHOLDER}, the graph placeholder: give a molecule with --task")
    session = load_session(args.checkpoint, args.tokenizer, double_bos=False if args.single_bos else None,
                           mesh_config=_mesh(args.mesh))
    if args.system is not None:
        session.tokenizer.system_prompt = args.system
    ids = session.tokenizer.encode_prompt(args.prompt).input_ids
    _print_answers(session, session.generator.generate([ids], config, row_seeds=[record_seed(config.seed, "prompt")]),
                   config)
    return 0


def _print_answers(session, out, config) -> None:
    answers = [session.decode(out.answer_ids(0, k)) for k in range(out.tokens.shape[1])]
    if config.num_beams == 1:
        print(answers[0])
    else:
        for answer, score in zip(answers, out.scores[0]):
            print(f"{score:.4f}\t{answer}")


def run_eval(args: argparse.Namespace) -> int:
    from omnimol_jax.eval.runner import SKIPPED_FILE, EvalOptions, run_evaluation

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    config = generation_config(args)
    index, count = 0, 1
    if args.distributed:
        import jax

        from omnimol_jax.multihost import initialize_distributed

        initialize_distributed()
        index, count = jax.process_index(), jax.process_count()
    options = EvalOptions(
        checkpoint=args.checkpoint, data=args.data, tokenizer=args.tokenizer,
        double_bos=False if args.single_bos else None, mesh=_mesh(args.mesh), layout=args.layout,
        tasks=args.tasks, protocol=args.protocol, out=args.out, batch_size=args.batch_size, limit=args.limit,
        restart=args.restart, progress=not args.no_progress, mbr_samples=args.mbr_samples,
        number_median=args.number_median, constrained=args.constrained, temperature=args.temperature,
        greedy=args.greedy, process_index=index, process_count=count)
    result = run_evaluation(options, config)
    if index != 0:
        print(f"process {index} of {count}: its predictions went to {result.predictions}; process 0 merged them "
              "and wrote the report")
        return 0
    print(result.report["markdown"].read_text(), end="")
    if result.generation is not None:
        print(f"generation: {result.generation.summary()}")
    print(f"report: {result.report['markdown']}, {result.report['png']}, {result.out_dir / 'metrics'}/; "
          f"predictions: {result.predictions}"
          + (f"; {result.skipped} records skipped (see {result.out_dir / SKIPPED_FILE})" if result.skipped else ""),
          file=sys.stderr)
    return 0

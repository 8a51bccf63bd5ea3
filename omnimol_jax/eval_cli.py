"""`omnimol generate` (one answer for one input) and `omnimol eval` (batched generation over test splits, resumable
predictions JSONL, metrics in the reference and strict protocols, report).

Prompts are built by the data modules exactly as for training (`omnimol_jax.data.pipeline.generation_example`:
task template, llama3 chat format, the task's graph rule, one graph slot per atom). Generation runs through
`omnimol_jax.inference.Generator` (jitted, KV cache, fixed batch shapes).

`omnimol eval` writes into --out:
    predictions.jsonl   one record per test example: id ('<task>/<index in file>'), task, prediction, reference,
                        instruction, generated token count, whether a stop token ended it, and with --beams K
                        the K hypotheses and their scores, with --mbr-samples N the samples, with
                        --number-median K the integer-part candidates found per number. Appended after
                        every batch; a rerun resumes from it.
    eval_config.json    checkpoint and decoding settings; a rerun with different settings refuses to mix them
    skipped.json        test records that could not be turned into prompts (file, index, reason)
    metrics/<task>.json, metrics.md, summary.png   the report (omnimol_jax.eval.write_report)
Sampling is reproducible and independent of batching: each record's random stream is seeded by --seed and a
hash of its id, so a resumed run draws what an uninterrupted one would have drawn.
With --beams K on molecule tasks, `top<k>_exact_match` (k = 1, 3, 5, 10 up to K) is the share of ALL records
whose reference is among the first k hypotheses (InChI match; stereo ignored in the reference protocol).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

logger = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.jsonl"
SETTINGS_FILE = "eval_config.json"
SKIPPED_FILE = "skipped.json"
TOPK_VALUES = (1, 3, 5, 10)


class EvalError(RuntimeError):
    """A problem that stops generation or evaluation (message names the file or record)."""


# --------------------------------------------------------------------------------------------------
# Arguments


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
        "generate", help="answer one task input with a checkpoint",
        description="Builds the task's prompt exactly as training does (template, chat format, graph of the "
                    "input molecule per the task's rule) and prints the answer; with --beams K, K lines "
                    "'score<TAB>answer', best first.")
    _add_model_args(p)
    p.add_argument("--task", required=True, help="task key, e.g. forward, retrosynthesis, logp, molcap")
    p.add_argument("--input", required=True, help="the record's input (SELFIES, reaction, name or text)")
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
                    "the metrics of SPEC.md section 6 and writes per-task JSON, metrics.md and summary.png.")
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
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--mbr-samples", type=int, default=0, metavar="N",
                   help="number tasks: draw N samples (at --temperature, default 1.0) and answer with the one "
                        "closest to the others in absolute difference, the MAE-optimal choice (a median "
                        "sample) instead of greedy's leading-digit mode; 0 = off")
    _add_decoding_args(p, default_max_new=512)
    p.set_defaults(func=run_eval)


def generation_config(args: argparse.Namespace):
    from omnimol_jax.inference import GenerationConfig

    if args.greedy and (args.temperature or args.beams > 1):
        raise EvalError("--greedy excludes --temperature and --beams")
    if args.temperature is not None and args.temperature <= 0:
        raise EvalError("--temperature must be > 0 (leave it out for greedy decoding)")
    if args.temperature is not None and args.beams > 1:
        raise EvalError("beam search is deterministic: use --temperature or --beams, not both")
    if args.number_median < 0:
        raise EvalError(f"--number-median must be 0 (off) or a number of prefixes >= 1, got {args.number_median}")
    if args.number_median and (args.temperature is not None or args.beams > 1 or args.greedy):
        raise EvalError("--number-median is its own deterministic decoding: it excludes --temperature, --beams "
                        "and --greedy")
    try:
        return GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature or 0.0,
                                top_p=args.top_p, top_k=args.top_k, num_beams=args.beams,
                                length_penalty=args.length_penalty, seed=args.seed)
    except ValueError as err:
        raise EvalError(str(err)) from None


def parse_mesh(text: Optional[str]):
    """'data=2,tensor=4' -> MeshConfig (unnamed axes 1; 'data' takes the rest unless sized)."""
    from omnimol_jax.config import MeshConfig

    if not text:
        return None
    sizes: dict[str, int] = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in ("data", "fsdp", "tensor", "expert") or not value.strip().lstrip("-").isdigit():
            raise EvalError(f"--mesh: {part!r} is not AXIS=SIZE with AXIS in data, fsdp, tensor, expert")
        sizes[name] = int(value)
    config = MeshConfig(**{"data": -1 if "data" not in sizes else sizes["data"],
                           **{k: sizes.get(k, 1) for k in ("fsdp", "tensor", "expert")}})
    try:
        config.validate()
    except ValueError as err:
        raise EvalError(f"--mesh: {err}") from None
    return config


# --------------------------------------------------------------------------------------------------
# Model, tokenizer, generator


@dataclasses.dataclass
class InferenceSession:
    """A loaded checkpoint with its tokenizer and a Generator (with the SELFIES automaton when asked for)."""

    model: Any
    meta: dict
    tokenizer: Any
    generator: Any
    feature_mode: str
    checkpoint: Path

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()


def load_session(checkpoint: str | os.PathLike, tokenizer_path: Optional[str] = None, *,
                 double_bos: Optional[bool] = True,
                 mesh_text: Optional[str] = None, constrained: bool = False) -> InferenceSession:
    from omnimol_jax.checkpoint import ASSETS_DIR, CheckpointError, load_omnimol
    from omnimol_jax.data.tokenizer import EOS, TokenizerError, load_chat_tokenizer
    from omnimol_jax.inference import Generator, constraint_for_tokenizer
    from omnimol_jax.sharding import build_mesh

    checkpoint = Path(checkpoint)
    mesh_config = parse_mesh(mesh_text)
    mesh = build_mesh(mesh_config) if mesh_config is not None else None
    try:
        model, meta = load_omnimol(checkpoint, mesh=mesh)
    except (CheckpointError, FileNotFoundError) as err:
        raise EvalError(str(err)) from None
    tokenizer_source = Path(tokenizer_path) if tokenizer_path else checkpoint / ASSETS_DIR
    if double_bos is None:  # not chosen on the command line: follow the training data's convention
        double_bos = bool(meta.get("data", {}).get("double_bos", True))
    try:
        tokenizer = load_chat_tokenizer(tokenizer_source, double_bos=double_bos)
    except (FileNotFoundError, TokenizerError) as err:
        raise EvalError(f"tokenizer: {err} (pass --tokenizer, or save the tokenizer into "
                        f"{checkpoint / ASSETS_DIR})") from None
    config = model.language_model.config
    if tokenizer.vocab_size > config.vocab_size:
        raise EvalError(f"the tokenizer at {tokenizer_source} has {tokenizer.vocab_size} tokens, more than the "
                        f"model's vocabulary of {config.vocab_size}")
    stops = {tokenizer.eot_id}
    end_of_text = tokenizer.tokenizer.token_to_id(EOS)
    if end_of_text is not None:
        stops.add(end_of_text)
    constraint = constraint_for_tokenizer(tokenizer, config.vocab_size) if constrained else None
    generator = Generator(model, pad_token_id=tokenizer.pad_id, stop_token_ids=sorted(stops), mesh=mesh,
                          constraint=constraint)
    feature_mode = (meta.get("graph") or {}).get("feature_mode", "omnimol")
    return InferenceSession(model, meta, tokenizer, generator, feature_mode, checkpoint)


def number_median_decoder(session: InferenceSession, slots: int):
    """The median number decoder (inference/number_median.py) over the session's generator and tokenizer."""
    from omnimol_jax.inference.number_median import NumberMedianDecoder, number_tokens_for_tokenizer

    vocab_size = session.model.language_model.config.vocab_size
    try:
        number_tokens = number_tokens_for_tokenizer(session.tokenizer, vocab_size)
    except ValueError as err:
        raise EvalError(f"--number-median: {err}") from None
    return NumberMedianDecoder(session.generator, number_tokens, slots=slots)


def record_seed(seed: int, record_id: str) -> int:
    """A record's sampling stream: stable across runs, batchings and resumes."""
    digest = hashlib.blake2b(f"{seed}\x1f{record_id}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


# --------------------------------------------------------------------------------------------------
# omnimol generate


def prompt_example(spec, record: dict, tokenizer, feature_mode: str):
    """(prompt ids with graph slots, graph or None) for a record that has no answer (omnimol generate). The same
    steps as `pipeline.generation_example`, without its check of the reference answer."""
    from omnimol_jax.data import molecules, tasks
    from omnimol_jax.model.splice import expand_image_placeholder

    graph = molecules.graph_for(spec.graph_rule, record["input"], record, mode=feature_mode) \
        if spec.has_graph else None
    encoded = tokenizer.encode_prompt(tasks.user_message(spec, record))
    ids, _ = expand_image_placeholder(encoded.input_ids, graph.num_nodes if graph is not None else 0)
    return ids, graph


def default_instruction(task: str) -> Optional[str]:
    from omnimol_jax.data.corpus import INSTRUCTIONS

    options = INSTRUCTIONS.get(task)
    return options[0] if options else None


def run_generate(args: argparse.Namespace) -> int:
    from omnimol_jax.data import tasks

    try:
        config = generation_config(args)
        spec = tasks.get_task(args.task)
        record: dict[str, Any] = {"input": args.input}
        if not spec.question_pool:
            instruction = args.instruction or default_instruction(spec.key)
            if instruction is None:
                raise EvalError(f"task {spec.key!r} has no standard instruction; pass --instruction")
            record["instruction"] = instruction
        if "extracted_molecules" in spec.extra_fields:
            if not args.extracted_molecules:
                raise EvalError(f"task {spec.key!r} needs --extracted-molecules '{{\"SMILES\": \"$1$\"}}'")
            try:
                record["extracted_molecules"] = json.loads(args.extracted_molecules)
            except json.JSONDecodeError as err:
                raise EvalError(f"--extracted-molecules is not JSON: {err}") from None
        constrained = args.constrained and spec.output_type == tasks.OUTPUT_SELFIES
        if args.constrained and not constrained:
            print(f"note: --constrained applies to molecule-output tasks only; {spec.key} answers "
                  f"{spec.output_type}", file=sys.stderr)
        session = load_session(args.checkpoint, args.tokenizer, double_bos=False if args.single_bos else None,
                               mesh_text=args.mesh, constrained=constrained)
        try:
            ids, graph = prompt_example(spec, record, session.tokenizer, session.feature_mode)
        except ValueError as err:
            raise EvalError(f"input {args.input!r} for task {spec.key}: {err}") from None
        if args.number_median and spec.answers_number:
            answer = number_median_decoder(session, args.number_median).generate(
                [ids], [graph], max_new_tokens=config.max_new_tokens)[0]
            print(session.decode(answer.ids))
            return 0
        if args.number_median:
            print(f"note: --number-median applies to number-output tasks only; {spec.key} answers "
                  f"{spec.output_type}", file=sys.stderr)
        out = session.generator.generate([ids], config, [graph], row_seeds=[record_seed(config.seed, "generate")],
                                         constrained=constrained)
    except (EvalError, KeyError) as err:
        print(f"generate: {err}", file=sys.stderr)
        return 1
    answers = [session.decode(out.answer_ids(0, k)) for k in range(out.tokens.shape[1])]
    if config.num_beams == 1:
        print(answers[0])
    else:
        for answer, score in zip(answers, out.scores[0]):
            print(f"{score:.4f}\t{answer}")
    return 0


# --------------------------------------------------------------------------------------------------
# omnimol eval


@dataclasses.dataclass
class PendingExample:
    record_id: str
    task: str
    input_ids: Any
    graph: Any
    reference: Any
    record: dict


def _group_of(task: str, record: dict) -> Optional[str]:
    """Yield dataset (BH / SM) of a record when its metadata names one (R^2 is reported per dataset)."""
    if task != "yield":
        return None
    metadata = record.get("metadata") or {}
    for key in ("dataset", "source_dataset", "subset"):
        if isinstance(metadata.get(key), str):
            return metadata[key]
    return None


def _settings(args: argparse.Namespace, session: InferenceSession, config) -> dict:
    return {"checkpoint": str(session.checkpoint.resolve()), "decoding": dataclasses.asdict(config),
            "mbr_samples": args.mbr_samples, "number_median": args.number_median,
            "constrained": bool(args.constrained), "double_bos": session.tokenizer.double_bos,
            "tokenizer": str(Path(args.tokenizer).resolve()) if args.tokenizer else None}


def _check_settings(out_dir: Path, settings: dict, restart: bool) -> None:
    path = out_dir / SETTINGS_FILE
    predictions = out_dir / PREDICTIONS_FILE
    if restart and predictions.exists():
        predictions.unlink()
    if predictions.exists() and path.exists():
        previous = json.loads(path.read_text())
        # A setting added after those predictions were made counts as off there: they still resume when it is off.
        changed = sorted(k for k in set(previous) | set(settings)
                         if previous.get(k) != settings.get(k) and (k in previous or settings[k]))
        if changed:
            raise EvalError(f"{predictions} holds predictions made with different settings ({', '.join(changed)}); "
                            f"pass --restart to discard them or choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2) + "\n")


def _batches(items: Sequence[PendingExample], size: int) -> Iterator[list[PendingExample]]:
    """Prompts sorted by length so a batch shares a length bucket (fewer pads, fewer compiled shapes)."""
    ordered = sorted(items, key=lambda e: (len(e.input_ids), e.record_id))
    for start in range(0, len(ordered), size):
        yield ordered[start:start + size]


def _record(example: PendingExample, prediction: str, **extra) -> dict:
    record = {"id": example.record_id, "task": example.task, "prediction": prediction,
              "reference": example.reference, "instruction": example.record.get("instruction", ""), **extra}
    group = _group_of(example.task, example.record)
    if group is not None:
        record["group"] = group
    return record


def _prediction_records(batch: list[PendingExample], out, session: InferenceSession, beams: int) -> list[dict]:
    records = []
    for row, example in enumerate(batch):
        answers = [session.decode(out.answer_ids(row, k)) for k in range(out.tokens.shape[1])]
        extra = {"num_tokens": int(out.lengths[row, 0]), "finished": bool(out.finished[row, 0])}
        if beams > 1:
            extra.update(predictions=answers, scores=[float(s) for s in out.scores[row]])
        records.append(_record(example, answers[0], **extra))
    return records


def _mbr_prediction_records(batch: list[PendingExample], session: InferenceSession, config, samples: int,
                            rows: int) -> list[dict]:
    """N seeded samples per prompt, answered with their L1 medoid (see inference/mbr.py)."""
    from omnimol_jax.inference.mbr import l1_medoid

    expanded = [e for e in batch for _ in range(samples)]
    out = session.generator.generate(
        [e.input_ids for e in expanded], config, [e.graph for e in expanded], rows=rows,
        row_seeds=[record_seed(config.seed, f"{e.record_id}#{k % samples}") for k, e in enumerate(expanded)],
        record_ids=[e.record_id for e in expanded])
    records = []
    for i, example in enumerate(batch):
        answers = [session.decode(out.answer_ids(i * samples + k, 0)) for k in range(samples)]
        chosen = l1_medoid(answers) or 0
        records.append(_record(example, answers[chosen], num_tokens=int(out.lengths[i * samples + chosen, 0]),
                               finished=bool(out.finished[i * samples + chosen, 0]), decoding=f"mbr-{samples}",
                               samples=answers))
    return records


def _median_prediction_records(batch: list[PendingExample], session: InferenceSession, decoder, rows: int,
                               max_new_tokens: int) -> list[dict]:
    """Numbers answered with the median of the model's distribution (see inference/number_median.py)."""
    answers = decoder.generate([e.input_ids for e in batch], [e.graph for e in batch], max_new_tokens=max_new_tokens,
                               rows=rows, record_ids=[e.record_id for e in batch])
    return [_record(example, session.decode(answer.ids), num_tokens=len(answer.ids), finished=answer.finished,
                    decoding=f"median-{decoder.slots}", numbers=answer.numbers)
            for example, answer in zip(batch, answers)]


def topk_exact_match(records: Sequence[dict], protocol: str, beams: int) -> dict[str, float]:
    """Share of records whose reference molecule is among the first k hypotheses (all records count)."""
    from omnimol_jax.eval.mol_metrics import mol_to_inchi, parse_selfies

    ks = [k for k in TOPK_VALUES if k <= beams]
    hits = {k: 0 for k in ks}
    for record in records:
        target = parse_selfies(str(record["reference"]), protocol)
        target_inchi = mol_to_inchi(target.mol) if target.valid else ""
        first_hit = None
        for rank, prediction in enumerate(record.get("predictions", [record["prediction"]])):
            parsed = parse_selfies(prediction, protocol)
            if target_inchi and parsed.valid and mol_to_inchi(parsed.mol) == target_inchi:
                first_hit = rank
                break
        for k in ks:
            hits[k] += first_hit is not None and first_hit < k
    return {f"top{k}_exact_match": hits[k] / len(records) for k in ks} if records else {}


def evaluate_predictions(store, task_ids: dict[str, list[str]], protocols: Sequence[str], tokenize_fn,
                         beams: int) -> dict:
    """{task: {protocol: metrics}} from stored predictions (tasks with no prediction are left out)."""
    from omnimol_jax.data.tasks import get_task
    from omnimol_jax.eval import compute_metrics_from_records

    results = {}
    for task, ids in task_ids.items():
        present = [i for i in ids if i in store]
        if not present:
            continue
        records = store.for_task(task, order=present)
        metrics = compute_metrics_from_records(task, records, protocols, tokenize_fn=tokenize_fn)
        if beams > 1 and get_task(task).metric_set == "molecule":
            for protocol in protocols:
                metrics[protocol].update(topk_exact_match(records, protocol, beams))
        results[task] = metrics
    return results


BASELINE_SUFFIX = " (train-mean baseline)"


def train_mean_baselines(results: dict, store, task_ids: dict[str, list[str]], data_dir: str, layout: str,
                         protocols: Sequence[str], tokenize_fn) -> dict:
    """For number-output tasks, the metrics of always answering the training split's mean (per homolumo
    property), scored on the same test records: the bar a model must clear to have learned anything."""
    from omnimol_jax.data import readers
    from omnimol_jax.data.tasks import get_task
    from omnimol_jax.eval import compute_metrics_from_records
    from omnimol_jax.eval.number_metrics import homolumo_property, number_in_text_parser

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
                records.append(dict(record, prediction=f"{means[key]:.6g}", predictions=None))
        if records:
            baselines[task + BASELINE_SUFFIX] = compute_metrics_from_records(
                task, [{k: v for k, v in r.items() if k != "predictions"} for r in records], protocols,
                tokenize_fn=tokenize_fn)
    return baselines


def run_eval(args: argparse.Namespace) -> int:
    try:
        return _run_eval(args)
    except (EvalError, FileNotFoundError, KeyError, ValueError) as err:
        print(f"eval: {err}", file=sys.stderr)
        return 1


def _run_eval(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from omnimol_jax.data import readers, tasks
    from omnimol_jax.data.pipeline import generation_example
    from omnimol_jax.eval import PROTOCOLS, PredictionStore, write_report

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    config = generation_config(args)
    if args.batch_size < 1:
        raise EvalError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise EvalError(f"--limit must be >= 1, got {args.limit}")
    if args.mbr_samples < 0 or args.mbr_samples == 1:
        raise EvalError(f"--mbr-samples must be 0 (off) or >= 2, got {args.mbr_samples}")
    if args.mbr_samples and (args.beams > 1 or args.greedy):
        raise EvalError("--mbr-samples samples: it excludes --beams and --greedy")
    if args.mbr_samples and args.number_median:
        raise EvalError("--mbr-samples and --number-median are two ways to decode numbers: choose one")
    mbr_config = (dataclasses.replace(config, temperature=args.temperature or 1.0) if args.mbr_samples else None)
    task_keys = (readers.available_tasks(args.data, args.layout) if args.tasks.strip() == "all"
                 else [t.strip() for t in args.tasks.replace("/", ",").split(",") if t.strip()])
    for key in task_keys:
        tasks.get_task(key)
    if not task_keys:
        raise EvalError(f"no task files in {args.data} ({args.layout} layout)")
    protocols = PROTOCOLS if args.protocol == "both" else (args.protocol,)
    wants_constraint = args.constrained and any(tasks.get_task(k).output_type == tasks.OUTPUT_SELFIES
                                                for k in task_keys)
    session = load_session(args.checkpoint, args.tokenizer, double_bos=False if args.single_bos else None,
                           mesh_text=args.mesh, constrained=wants_constraint)
    out_dir = Path(args.out) if args.out else Path("eval") / session.checkpoint.resolve().name
    _check_settings(out_dir, _settings(args, session, config), args.restart)
    store = PredictionStore(out_dir / PREDICTIONS_FILE)
    median_decoder = number_median_decoder(session, args.number_median) if args.number_median else None

    # Which test records each task has, and which still lack a prediction.
    sources, task_ids, missing = {}, {}, {}
    for key in task_keys:
        source = readers.open_task(args.data, key, "test", args.layout)
        count = len(source) if args.limit is None else min(len(source), args.limit)
        if count == 0:
            logger.warning("task %s: no test records in %s", key, source.path)
            continue
        sources[key] = source
        task_ids[key] = [f"{key}/{source.record_index(i)}" for i in range(count)]
        missing[key] = [i for i, rid in enumerate(task_ids[key]) if rid not in store]
    if not task_ids:
        raise EvalError(f"no test records for {task_keys} in {args.data}")
    total_missing = sum(len(v) for v in missing.values())
    done_before = sum(len(v) for v in task_ids.values()) - total_missing
    skipped: list[dict] = []
    max_positions = session.model.language_model.config.max_position_embeddings
    bar = tqdm(total=total_missing, desc="eval", unit="rec", disable=args.no_progress, file=sys.stderr)
    if done_before:
        bar.write(f"resuming: {done_before} predictions already in {store.path}")
    for key, indices in missing.items():
        spec, source = tasks.get_task(key), sources[key]
        constrained = wants_constraint and spec.output_type == tasks.OUTPUT_SELFIES
        pending = []
        for i in indices:
            record_id = task_ids[key][i]
            try:
                record = source[i]
                example = generation_example(spec, record, session.tokenizer, session.feature_mode)
            except ValueError as err:
                skipped.append({"id": record_id, "file": source.path, "record": source.record_index(i),
                                "reason": str(err)[:300]})
                logger.warning("skipped %s (%s record %d): %s", record_id, source.path, source.record_index(i), err)
                bar.update(1)
                continue
            if len(example.input_ids) + config.max_new_tokens > max_positions:
                reason = (f"prompt of {len(example.input_ids)} tokens + {config.max_new_tokens} new tokens exceeds "
                          f"the model's {max_positions} positions")
                skipped.append({"id": record_id, "file": source.path, "record": source.record_index(i),
                                "reason": reason})
                logger.warning("skipped %s: %s", record_id, reason)
                bar.update(1)
                continue
            pending.append(PendingExample(record_id, key, example.input_ids, example.graph, record["output"], record))
        bar.set_postfix_str(key)
        mbr = mbr_config is not None and spec.answers_number
        for batch in _batches(pending, args.batch_size):
            if median_decoder is not None and spec.answers_number:
                store.append(_median_prediction_records(batch, session, median_decoder, args.batch_size,
                                                        config.max_new_tokens))
                bar.update(len(batch))
                continue
            if mbr:
                store.append(_mbr_prediction_records(batch, session, mbr_config, args.mbr_samples,
                                                     rows=args.batch_size * args.mbr_samples))
                bar.update(len(batch))
                continue
            out = session.generator.generate(
                [e.input_ids for e in batch], config, [e.graph for e in batch], constrained=constrained,
                rows=args.batch_size, row_seeds=[record_seed(config.seed, e.record_id) for e in batch],
                record_ids=[e.record_id for e in batch])
            store.append(_prediction_records(batch, out, session, config.num_beams))
            bar.update(len(batch))
    bar.close()
    (out_dir / SKIPPED_FILE).write_text(json.dumps(skipped, indent=2) + "\n")

    def tokenize_fn(text: str) -> list[str]:
        return session.tokenizer.tokenizer.encode(text, add_special_tokens=False).tokens

    results = evaluate_predictions(store, task_ids, protocols, tokenize_fn, config.num_beams)
    if not results:
        raise EvalError("no predictions to score (every record was skipped; see skipped.json)")
    results.update(train_mean_baselines(results, store, task_ids, args.data, args.layout, protocols, tokenize_fn))
    paths = write_report(results, out_dir)
    print(paths["markdown"].read_text(), end="")
    print(f"report: {paths['markdown']}, {paths['png']}, {out_dir / 'metrics'}/; predictions: {store.path}"
          + (f"; {len(skipped)} records skipped (see {out_dir / SKIPPED_FILE})" if skipped else ""),
          file=sys.stderr)
    return 0

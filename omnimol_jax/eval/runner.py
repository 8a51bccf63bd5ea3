"""The evaluation runner behind `omnimol eval`: test records -> prompts -> batched generation -> resumable
predictions -> metrics in both protocols -> report.

Prompts are built by the data modules exactly as for training (`omnimol_jax.data.prompts`). The output folder:
    predictions.jsonl   one record per test example: id ('<task>/<index in file>'), task, prediction (clean),
                        raw (special tokens kept; eval/answers.py), reference, instruction, generated token count,
                        whether a stop token ended it, and with beams the K hypotheses and their scores, with MBR
                        the samples, with number-median decoding the integer-part candidates found per number.
                        Appended after every batch; a rerun resumes.
    eval_config.json    checkpoint and decoding settings; a rerun with different settings refuses to mix them
    skipped.json        test records that could not be turned into prompts (file, index, reason)
    metrics/<task>.json, metrics.md, summary.png   the report (omnimol_jax.eval.report.write_report)
Sampling is reproducible and independent of batching: each record's random stream is seeded by the seed and a
hash of its id, so a resumed run draws what an uninterrupted one would have drawn. With K beams on molecule
tasks, `top<k>_exact_match` (k = 1, 3, 5, 10 up to K) is the share of ALL records whose reference is among the
first k hypotheses (InChI match; stereo ignored in the reference protocol).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from tqdm.auto import tqdm

from omnimol_jax import tasks
from omnimol_jax.compile_watch import CompileWatch
from omnimol_jax.config import MeshConfig
from omnimol_jax.data import readers
from omnimol_jax.data.prompts import generation_example
from omnimol_jax.errors import InputError
from omnimol_jax.eval import answers
from omnimol_jax.eval.baselines import answer_baselines, train_mean_baselines
from omnimol_jax.eval.metrics import compute_metrics_from_records
from omnimol_jax.eval.mol_metrics import PROTOCOL_REFERENCE, PROTOCOLS, mol_to_inchi, parse_selfies
from omnimol_jax.eval.molecule_sets import canonical_molecules, molecule_set_metrics
from omnimol_jax.eval.prediction_parts import PredictionParts, part_files, part_path
from omnimol_jax.eval.report import PredictionStore, write_report
from omnimol_jax.eval.wordnet import prefetch_wordnet, wordnet_status
from omnimol_jax.inference.decoding import GenerationConfig
from omnimol_jax.inference.mbr import l1_medoid
from omnimol_jax.inference.number_median import decoding_memory_budget
from omnimol_jax.inference.prompt_buckets import plan_batch_lengths
from omnimol_jax.inference.session import InferenceSession, load_session, number_median_decoder, record_seed
from omnimol_jax.multihost import barrier
from omnimol_jax.tasks import get_task

logger = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.jsonl"
SETTINGS_FILE = "eval_config.json"
SKIPPED_FILE = "skipped.json"
TOPK_VALUES = (1, 3, 5, 10)
# A prompt length that fewer batches of a decoder would use is merged into the next longer one: on the demo's eval,
# padding a few batches to a longer length cost less than compiling a program of their own.
PLAN_MIN_BATCHES = 16


class EvalError(InputError):
    """A problem that stops evaluation (the message names the file or record)."""


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """What to evaluate and how (the flags of `omnimol eval` besides decoding)."""

    checkpoint: str
    data: str
    tokenizer: Optional[str] = None
    double_bos: Optional[bool] = None  # None: what the checkpoint was trained with
    mesh: Optional[MeshConfig] = None
    layout: str = "omnimol"
    tasks: str = "all"
    protocol: str = "both"  # reference | strict | both
    out: Optional[str] = None
    batch_size: int = 8
    limit: Optional[int] = None
    restart: bool = False
    progress: bool = True
    mbr_samples: int = 0
    number_median: int = 0
    constrained: bool = False
    temperature: Optional[float] = None  # MBR samples at this temperature (default 1.0)
    greedy: bool = False
    # Several processes (`omnimol eval --distributed`): each generates every process_count-th batch on its own
    # devices, process 0 merges the predictions and scores
    process_index: int = 0
    process_count: int = 1


@dataclasses.dataclass(frozen=True)
class EvalResult:
    out_dir: Path
    report: dict
    predictions: Path
    skipped: int
    generation: Optional[CompileWatch] = None  # the generation stage: its compiles and wall time


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


def _settings(options: EvalOptions, session: InferenceSession, config: GenerationConfig) -> dict:
    return {"checkpoint": str(session.checkpoint.resolve()), "decoding": dataclasses.asdict(config),
            "mbr_samples": options.mbr_samples, "number_median": options.number_median,
            "constrained": bool(options.constrained), "double_bos": session.tokenizer.double_bos,
            "text_only": not (session.has_graph_tower and session.graph_tokens),
            "tokenizer": str(Path(options.tokenizer).resolve()) if options.tokenizer else None}


def _check_settings(out_dir: Path, settings: dict) -> None:
    path = out_dir / SETTINGS_FILE
    predictions = out_dir / PREDICTIONS_FILE
    if (predictions.exists() or part_files(out_dir)) and path.exists():
        previous = json.loads(path.read_text())
        # A setting added after those predictions were made counts as off there: they still resume when it is off.
        changed = sorted(k for k in set(previous) | set(settings)
                         if previous.get(k) != settings.get(k) and (k in previous or settings[k]))
        if changed:
            raise EvalError(f"{predictions} holds predictions made with different settings ({', '.join(changed)}); "
                            f"pass --restart to discard them or choose another --out")


def _write_settings(out_dir: Path, settings: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")


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
        extra = {"raw": session.decode_raw(out.generated_ids(row, 0)), "num_tokens": int(out.lengths[row, 0]),
                 "finished": bool(out.finished[row, 0])}
        if beams > 1:
            extra.update(predictions=answers, scores=[float(s) for s in out.scores[row]])
        records.append(_record(example, answers[0], **extra))
    return records


def _mbr_prediction_records(batch: list[PendingExample], session: InferenceSession, config, samples: int,
                            rows: int, bucket: Optional[int] = None) -> list[dict]:
    """N seeded samples per prompt, answered with their L1 medoid (see inference/mbr.py)."""
    expanded = [e for e in batch for _ in range(samples)]
    out = session.generator.generate(
        [e.input_ids for e in expanded], config, [e.graph for e in expanded], rows=rows,
        row_seeds=[record_seed(config.seed, f"{e.record_id}#{k % samples}") for k, e in enumerate(expanded)],
        record_ids=[e.record_id for e in expanded], bucket=bucket)
    records = []
    for i, example in enumerate(batch):
        answers = [session.decode(out.answer_ids(i * samples + k, 0)) for k in range(samples)]
        chosen = l1_medoid(answers) or 0
        raw = session.decode_raw(out.generated_ids(i * samples + chosen))
        records.append(_record(example, answers[chosen], raw=raw,
                               num_tokens=int(out.lengths[i * samples + chosen, 0]),
                               finished=bool(out.finished[i * samples + chosen, 0]), decoding=f"mbr-{samples}",
                               samples=answers))
    return records


def _median_prediction_records(batch: list[PendingExample], session: InferenceSession, decoder, rows: int,
                               max_new_tokens: int, bucket: Optional[int] = None) -> list[dict]:
    """Numbers answered with the median of the model's distribution (see inference/number_median.py)."""
    answers = decoder.generate([e.input_ids for e in batch], [e.graph for e in batch], max_new_tokens=max_new_tokens,
                               rows=rows, record_ids=[e.record_id for e in batch], bucket=bucket)
    return [_record(example, session.decode(answer.ids),
                    raw=session.decode_raw(answer.ids + ([answer.stop_id] if answer.stop_id is not None else [])),
                    num_tokens=len(answer.ids), finished=answer.finished,
                    decoding=f"median-{decoder.slots}", numbers=answer.numbers)
            for example, answer in zip(batch, answers)]


def topk_exact_match(records: Sequence[dict], protocol: str, beams: int) -> dict[str, float]:
    """Share of records whose reference molecule is among the first k hypotheses (all records count)."""
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


def stopped_share(records: Sequence[dict], tokenize_fn) -> dict[str, float]:
    """`stopped_2x`: share of records whose answer ended with a stop token within twice the reference's length in
    tokens (plus the stop token): a molecule answer that runs on past that is no answer, whatever its score."""
    if not records or not all("num_tokens" in r and "finished" in r for r in records):
        return {}
    stopped = sum(bool(r["finished"]) and int(r["num_tokens"]) <= 2 * len(tokenize_fn(str(r["reference"]))) + 1
                  for r in records)
    return {"stopped_2x": stopped / len(records)}


def train_answer_molecules(data_dir: str, layout: str) -> Callable[[str, str], Optional[set[str]]]:
    """(task, protocol) -> the canonical SMILES of the task's training answers (None without a training split): the
    reference set of novelty. Each set is built once."""
    cache: dict[tuple[str, str], Optional[set[str]]] = {}

    def molecules(task: str, protocol: str) -> Optional[set[str]]:
        if (task, protocol) not in cache:
            try:
                train = readers.open_task(data_dir, task, "train", layout)
            except (FileNotFoundError, KeyError):
                train = None
            cache[task, protocol] = None if train is None or not len(train) else set(canonical_molecules(
                (str(train[i].get("output", "")) for i in range(len(train))), protocol))
        return cache[task, protocol]

    return molecules


def evaluate_predictions(store, task_ids: dict[str, list[str]], protocols: Sequence[str], tokenize_fn,
                         beams: int, end_of_turn: str = answers.EOT,
                         train_molecules: Optional[Callable[[str, str], Optional[set[str]]]] = None) -> dict:
    """{task: {protocol: metrics}} from stored predictions (tasks with no prediction are left out); molecule tasks
    also get the set metrics (uniqueness, novelty against `train_molecules(task, protocol)`, FCD)."""
    results = {}
    for task, ids in task_ids.items():
        present = [i for i in ids if i in store]
        if not present:
            continue
        records = store.for_task(task, order=present)
        metrics = compute_metrics_from_records(task, records, protocols, tokenize_fn=tokenize_fn,
                                               end_of_turn=end_of_turn)
        if get_task(task).metric_set == "molecule":
            stopped = stopped_share(records, tokenize_fn)  # the same under both protocols: tokenize once
            references = [r["reference"] for r in records]
            for protocol in protocols:
                metrics[protocol].update(stopped)
                predicted = [answers.protocol_answer(task, a, protocol, end_of_turn)
                             for a in answers.record_answers(records, protocol)[0]]
                metrics[protocol].update(molecule_set_metrics(
                    predicted, references, train_molecules(task, protocol) if train_molecules else None, protocol))
                if beams > 1:
                    metrics[protocol].update(topk_exact_match(records, protocol, beams))
        results[task] = metrics
    return results


def report_conventions(store, task_ids: dict[str, list[str]], protocols: Sequence[str],
                       end_of_turn: str = answers.EOT) -> dict[str, str]:
    """How answers were read and scored, for the report's header: each protocol's conventions, METEOR's WordNet
    when a text task was scored, and how many records lacked the raw answer the reference protocol reads."""
    conventions = {protocol: answers.conventions(protocol, end_of_turn) for protocol in protocols}
    if any(answers.is_text_task(task) for task in task_ids):
        conventions["METEOR"] = wordnet_status()[1]
    if any(get_task(task).metric_set == "procedure" for task in task_ids):
        conventions["lev_ge_t"] = ("share of answers whose normalised Levenshtein similarity to the target string "
                                   "is >= t, as intended (the public code's 'Accuracy' compares token lists and "
                                   "is always 0)")
    without_raw = answers.record_answers([store.records[i] for ids in task_ids.values() for i in ids if i in store],
                                         PROTOCOL_REFERENCE)[1]
    if without_raw and PROTOCOL_REFERENCE in protocols:
        conventions["raw answers"] = (f"{without_raw} records of {store.path} have no raw answer (written by an "
                                      "older version): the reference protocol read their clean answer; rerun "
                                      "with --restart to score them as the public code does")
    return conventions


def _pending_examples(task: str, source, record_ids: list[str], indices: Sequence[int], session: InferenceSession,
                      config: GenerationConfig, skipped: list[dict], bar) -> list[PendingExample]:
    """The prompts of one task's records still to answer; records that cannot be prompted go to `skipped`."""
    spec = session.task_view(tasks.get_task(task))
    model_config = session.language_config
    pending = []
    for i in indices:
        record_id = record_ids[i]
        try:
            record = source[i]
            example = generation_example(spec, record, session.tokenizer, session.feature_mode)
            reason = model_config.position_overflow(len(example.input_ids), config.max_new_tokens)
        except ValueError as err:
            reason = str(err)[:300]
        if reason:
            skipped.append({"id": record_id, "file": source.path, "record": source.record_index(i),
                            "reason": reason})
            logger.warning("skipped %s (%s record %d): %s", record_id, source.path, source.record_index(i), reason)
            bar.update(1)
            continue
        pending.append(PendingExample(record_id, task, example.input_ids, example.graph, record["output"],
                                      record))
    return pending


def _generate(pending: dict[str, list[PendingExample]], options: EvalOptions, session: InferenceSession,
              config: GenerationConfig, mbr_config: Optional[GenerationConfig], median_decoder,
              wants_constraint: bool, store: PredictionStore, bar) -> list[str]:
    """Answers the pending examples, batch by batch, appending each batch's records to the store; returns the
    record ids of every process's batches in the order one process answers them.

    Every batch's padded prompt length is planned first, for each decoder apart (prompt_buckets.py): one compile
    per (decoder, planned length), instead of one per power of two that some batch happens to need. With several
    processes each answers every process_count-th batch of that plan: the batches, their shapes and so their
    numbers are those of a single process."""
    def decoder_of(key: str) -> str:  # batches of one decoder share programs (constrained decoding is another)
        spec = tasks.get_task(key)
        if spec.answers_number and median_decoder is not None:
            return "median"
        if spec.answers_number and mbr_config is not None:
            return "mbr"
        return "constrained" if wants_constraint and spec.output_type == tasks.OUTPUT_SELFIES else "generate"

    decoders = {key: decoder_of(key) for key in pending}
    batches = [(key, batch) for key, examples in pending.items() for batch in _batches(examples, options.batch_size)]
    buckets = plan_batch_lengths([max(len(e.input_ids) for e in batch) for _, batch in batches],
                                 [decoders[key] for key, _ in batches],
                                 min_length=session.generator.min_prompt_bucket, min_batches=PLAN_MIN_BATCHES)
    share = [(position, key, batch, bucket) for position, ((key, batch), bucket) in enumerate(zip(batches, buckets))
             if position % options.process_count == options.process_index]
    bar.total = bar.n + sum(len(batch) for _, _, batch, _ in share)
    bar.refresh()
    for _, key, batch, bucket in share:
        decoder = decoders[key]
        bar.set_postfix_str(key)
        if decoder == "median":  # K cache rows per prompt: as many prompts per call as the memory holds
            size = min(options.batch_size, median_decoder.max_prompts(bucket, config.max_new_tokens,
                                                                      decoding_memory_budget()))
            records = [r for part in _batches(batch, size) for r in _median_prediction_records(
                part, session, median_decoder, size, config.max_new_tokens, bucket)]
        elif decoder == "mbr":
            records = _mbr_prediction_records(batch, session, mbr_config, options.mbr_samples,
                                              options.batch_size * options.mbr_samples, bucket)
        else:
            out = session.generator.generate(
                [e.input_ids for e in batch], config, [e.graph for e in batch],
                constrained=decoder == "constrained", rows=options.batch_size,
                row_seeds=[record_seed(config.seed, e.record_id) for e in batch],
                record_ids=[e.record_id for e in batch], bucket=bucket)
            records = _prediction_records(batch, out, session, config.num_beams)
        store.append(records)
        bar.update(len(batch))
    return [example.record_id for _, batch in batches for example in batch]


def _local_devices() -> list:
    import jax

    return jax.local_devices()


def run_evaluation(options: EvalOptions, config: GenerationConfig) -> EvalResult:
    """Generates what is missing from <out>/predictions.jsonl, scores every task and writes the report."""
    if options.batch_size < 1:
        raise EvalError(f"--batch-size must be >= 1, got {options.batch_size}")
    if options.limit is not None and options.limit < 1:
        raise EvalError(f"--limit must be >= 1, got {options.limit}")
    if options.mbr_samples < 0 or options.mbr_samples == 1:
        raise EvalError(f"--mbr-samples must be 0 (off) or >= 2, got {options.mbr_samples}")
    if options.mbr_samples and (config.num_beams > 1 or options.greedy):
        raise EvalError("--mbr-samples samples: it excludes --beams and --greedy")
    if options.mbr_samples and options.number_median:
        raise EvalError("--mbr-samples and --number-median are two ways to decode numbers: choose one")
    mbr_config = dataclasses.replace(config, temperature=options.temperature or 1.0) if options.mbr_samples else None
    task_keys = [name for name, _ in tasks.resolve_task_list(
        tasks.parse_task_list(options.tasks, key="--tasks"), lambda: readers.available_tasks(options.data,
                                                                                             options.layout))]
    if not task_keys:
        raise EvalError(f"no task files in {options.data} ({options.layout} layout)")
    protocols = PROTOCOLS if options.protocol == "both" else (options.protocol,)
    if any(answers.is_text_task(key) for key in task_keys):
        prefetch_wordnet()  # METEOR's WordNet loads while the model generates
    wants_constraint = options.constrained and any(tasks.get_task(k).output_type == tasks.OUTPUT_SELFIES
                                                for k in task_keys)
    out_dir = Path(options.out) if options.out else Path("eval") / Path(options.checkpoint).resolve().name
    index, count = options.process_index, options.process_count
    lead = index == 0
    # A malformed predictions file stops here, before the model is loaded or anything is written (--restart
    # discards the file instead).
    store = None if options.restart else PredictionStore(out_dir / PREDICTIONS_FILE)
    parts = None if options.restart else PredictionParts(out_dir)
    # several processes: each holds the whole model on its own devices and answers its share of the batches
    session = load_session(options.checkpoint, options.tokenizer, double_bos=options.double_bos,
                           mesh_config=options.mesh, constrained=wants_constraint,
                           devices=_local_devices() if count > 1 else None)
    if not (session.has_graph_tower and session.graph_tokens):
        logger.warning("%s reads no graphs (%s): every task is prompted as text, molecules as SELFIES",
                       options.checkpoint, "a plain language model" if not session.has_graph_tower
                       else "trained with data.graph_tokens=false")
    settings = _settings(options, session, config)
    if not options.restart:
        _check_settings(out_dir, settings)  # every process alike: all stop, none waits for the others
    barrier("omnimol-eval-checked")
    if lead:
        if options.restart:
            (out_dir / PREDICTIONS_FILE).unlink(missing_ok=True)
            PredictionParts(out_dir).delete()
        _write_settings(out_dir, settings)
    barrier("omnimol-eval-prepared")
    if store is None:
        store, parts = PredictionStore(out_dir / PREDICTIONS_FILE), PredictionParts(out_dir)
    median_decoder = number_median_decoder(session, options.number_median) if options.number_median else None

    # Which test records each task has, and which still lack a prediction.
    sources, task_ids, missing = {}, {}, {}
    for key in task_keys:
        source = readers.open_task(options.data, key, "test", options.layout)
        count = len(source) if options.limit is None else min(len(source), options.limit)
        if count == 0:
            logger.warning("task %s: no test records in %s", key, source.path)
            continue
        sources[key] = source
        task_ids[key] = [f"{key}/{source.record_index(i)}" for i in range(count)]
        missing[key] = [i for i, rid in enumerate(task_ids[key]) if rid not in store and rid not in parts]
    if not task_ids:
        raise EvalError(f"no test records for {task_keys} in {options.data}")
    total_missing = sum(len(v) for v in missing.values())
    done_before = sum(len(v) for v in task_ids.values()) - total_missing
    bar = tqdm(total=total_missing, desc="eval", unit="rec", disable=not (options.progress and lead),
               file=sys.stderr)
    if done_before:
        bar.write(f"resuming: {done_before} predictions already in {store.path}")
    skipped: list[dict] = []
    pending = {key: _pending_examples(key, sources[key], task_ids[key], indices, session, config, skipped, bar)
               for key, indices in missing.items()}
    writer = store if count == 1 else PredictionStore(part_path(out_dir, index, count))
    generation = CompileWatch().start()
    try:
        planned = _generate(pending, options, session, config, mbr_config, median_decoder, wants_constraint,
                            writer, bar)
    finally:
        generation.stop()
    bar.close()
    barrier("omnimol-eval-generated")
    if not lead:  # process 0 merges and scores
        return EvalResult(out_dir=out_dir, report={}, predictions=writer.path, skipped=len(skipped),
                          generation=generation)
    PredictionParts(out_dir).merge_into(store, planned)
    (out_dir / SKIPPED_FILE).write_text(json.dumps(skipped, indent=2) + "\n")

    def tokenize_fn(text: str) -> list[str]:
        return session.tokenizer.tokenizer.encode(text, add_special_tokens=False).tokens

    end_of_turn = session.tokenizer.end_of_turn
    results = evaluate_predictions(store, task_ids, protocols, tokenize_fn, config.num_beams, end_of_turn,
                                   train_answer_molecules(options.data, options.layout))
    if not results:
        raise EvalError("no predictions to score (every record was skipped; see skipped.json)")
    baselines = train_mean_baselines(results, store, task_ids, options.data, options.layout, protocols, tokenize_fn,
                                     end_of_turn)
    baselines.update(answer_baselines(results, store, task_ids, options.data, options.layout, protocols,
                                      tokenize_fn, end_of_turn))
    results.update(baselines)
    paths = write_report(results, out_dir, report_conventions(store, task_ids, protocols, end_of_turn))
    return EvalResult(out_dir=out_dir, report=paths, predictions=store.path, skipped=len(skipped),
                      generation=generation)

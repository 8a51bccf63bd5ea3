"""One entry point for every task's metrics: `compute_task_metrics(task, predictions, references, protocol)`.

The task registry (`omnimol_jax.tasks`) names each task's metric set; this module dispatches on it:

    molecule      validity, exact_match, bleu, levenshtein, maccs_fts, rdk_fts, morgan_fts   (mol_metrics)
    homolumo_mae  mae_homo, mae_lumo, mae_gap, mae                                        (number_metrics)
    number_mae    mae                                                                     (number_metrics)
    yield_r2      r2 (+ r2_<dataset> when datasets are given)                             (number_metrics)
    caption       bleu2, bleu4, meteor, rouge1, rouge2, rougeL
    procedure     caption's six + lev_ge_1.0, lev_ge_0.9, lev_ge_0.75, lev_ge_0.5

Every result also carries the counts n, n_valid, n_failed (molecule: invalid predictions; numbers:
unparseable predictions; text: empty predictions, which are scored like any other). All values are
fractions or raw units (the public code prints the experiment shares and validity in percent).

Text metrics (public `calc_mocap_metrics` / `calc_exp_metrics`, through the libraries it calls; see
text_metrics): BLEU-2 = corpus BLEU with weights (0.5, 0.5) and BLEU-4 with (0.25,)*4 on tokenizer pieces
(`tokenize_fn`, default: whitespace split with `<|...|>` tokens as pieces of their own; `omnimol eval` passes the
model tokenizer's pieces, as the public code does); METEOR = mean of NLTK's per-record METEOR on the same pieces
with WordNet 3.0 synonyms (eval/wordnet.py); ROUGE-1/2/L = mean F-measure on the answer strings with
rouge_score's default tokenizer. In the reference protocol the answer is the raw decoded text (eval/answers.py),
its pieces are cut to 512 as the public `tokenizer.tokenize(..., truncation=True, max_length=512)` does and
`<|eot_id|>` pieces are dropped; strict keeps the pieces whole. The experiment shares lev_ge_t are the fraction of
records whose normalised Levenshtein similarity (1 - d / max length) between the answer (reference protocol: the
text before `<|eot_id|>`) and the target STRING is >= t. The public code passes a list holding the reference
token list against the hypothesis token list to textdistance, which scores every record 0 (a bug); we compute
what the copied paragraph2actions function computes on strings.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from omnimol_jax.eval.answers import EOT, drop_eot_pieces, protocol_answer, record_answers, split_special_tokens
from omnimol_jax.eval.mol_metrics import PROTOCOL_REFERENCE, PROTOCOLS, check_protocol, molecule_metrics
from omnimol_jax.eval.number_metrics import homolumo_metrics, homolumo_property, number_in_text_metrics, yield_metrics
from omnimol_jax.eval.text_metrics import (
    BLEU2_WEIGHTS,
    BLEU4_WEIGHTS,
    corpus_bleu,
    default_wordnet,
    meteor_score,
    normalized_levenshtein_similarity,
    rouge_scores,
)
from omnimol_jax.tasks import METRIC_SETS, get_task

TokenizeFn = Callable[[str], Sequence[str]]
Reference = str | int | float

REFERENCE_MAX_TOKENS = 512  # public: tokenizer.tokenize(text, truncation=True, max_length=512)
LEVENSHTEIN_THRESHOLDS = (("lev_ge_1.0", 1.0), ("lev_ge_0.9", 0.9), ("lev_ge_0.75", 0.75), ("lev_ge_0.5", 0.5))
COUNT_KEYS = ("n", "n_valid", "n_failed")


def _as_text(value: Any, what: str, record: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"record {record}: the {what} must be a string, got {type(value).__name__} ({value!r:.80})")
    return value


def text_metrics(predictions: Sequence[str], references: Sequence[str], protocol: str, record_ids: Sequence[str],
                 tokenize_fn: Optional[TokenizeFn] = None, wordnet: Optional[object] = None,
                 levenshtein_shares: bool = False, end_of_turn: str = EOT) -> dict[str, float]:
    """Caption-style metrics (and, with `levenshtein_shares`, the experiment-procedure shares)."""
    check_protocol(protocol)
    tokenize = tokenize_fn or split_special_tokens
    reference_protocol = protocol == PROTOCOL_REFERENCE
    limit = REFERENCE_MAX_TOKENS if reference_protocol else None
    wordnet = wordnet if wordnet is not None else default_wordnet()
    hypotheses, reference_lists, meteors, rouges, similarities = [], [], [], [], []
    n_failed = 0
    for prediction, reference, record in zip(predictions, references, record_ids):
        prediction = _as_text(prediction, "prediction", record)
        reference = _as_text(reference, "reference", record)
        n_failed += not prediction.split(end_of_turn)[0].strip()
        hypothesis_tokens = list(tokenize(prediction))[:limit]
        reference_tokens = list(tokenize(reference))[:limit]
        if reference_protocol:
            hypothesis_tokens = drop_eot_pieces(hypothesis_tokens, end_of_turn)
            reference_tokens = drop_eot_pieces(reference_tokens, end_of_turn)
        hypotheses.append(hypothesis_tokens)
        reference_lists.append([reference_tokens])
        meteors.append(meteor_score([reference_tokens], hypothesis_tokens, wordnet=wordnet))
        rouges.append(rouge_scores(reference, prediction))
        if levenshtein_shares:
            answer = prediction.split(end_of_turn)[0] if reference_protocol else prediction
            similarities.append(normalized_levenshtein_similarity(answer, reference))
    metrics = {
        "bleu2": corpus_bleu(reference_lists, hypotheses, BLEU2_WEIGHTS),
        "bleu4": corpus_bleu(reference_lists, hypotheses, BLEU4_WEIGHTS),
        "meteor": float(np.mean(meteors)),
        **{key: float(np.mean([r[key] for r in rouges])) for key in ("rouge1", "rouge2", "rougeL")},
    }
    if levenshtein_shares:
        scores = np.asarray(similarities)
        for name, threshold in LEVENSHTEIN_THRESHOLDS:
            metrics[name] = float(np.mean(scores >= threshold))
    n = len(predictions)
    metrics.update({"n": n, "n_valid": n - n_failed, "n_failed": n_failed})
    return metrics


def compute_task_metrics(task: str, predictions: Sequence[str], references: Sequence[Reference],
                         protocol: str = PROTOCOL_REFERENCE, *, tokenize_fn: Optional[TokenizeFn] = None,
                         record_ids: Optional[Sequence[Any]] = None, instructions: Optional[Sequence[str]] = None,
                         groups: Optional[Sequence[str]] = None,
                         wordnet: Optional[object] = None, end_of_turn: str = EOT) -> dict[str, float]:
    """Metrics of one task's predictions under one protocol ('reference' or 'strict').

    predictions   the answers, one per record: in the reference protocol as decoded with special tokens kept (the
                  raw form; eval/answers.py cuts molecule and number answers at the first <|eot_id|>), in the
                  strict protocol cleaned (special tokens dropped, stripped)
    references    the records' `output` values (SELFIES, text, or numbers / numeric strings)
    tokenize_fn   text -> pieces for BLEU/METEOR of text tasks (default: whitespace split)
    record_ids    names used in error messages (default: the record's index)
    instructions  homolumo only: the questions, to tell HOMO / LUMO / gap apart (unless `groups` is given)
    groups        homolumo: the property of each record (HOMO, LUMO, gap); yield: the dataset of each record
                  (e.g. 'BH', 'SM'), giving r2_BH, r2_SM; ignored otherwise
    wordnet       text tasks: METEOR's WordNet (default: WordNet 3.0, see eval/wordnet.py;
                  `text_metrics.EmptyWordNet()` scores without synonyms)
    end_of_turn   the token text that ends a raw answer (`<|eot_id|>`; the model tokenizer's, e.g. `<|im_end|>`)
    """
    spec = get_task(task)
    check_protocol(protocol)
    n = len(predictions)
    if len(references) != n:
        raise ValueError(f"task {task}: {n} predictions but {len(references)} references")
    if n == 0:
        raise ValueError(f"task {task}: no records to evaluate")
    ids = [str(i) for i in (record_ids if record_ids is not None else range(n))]
    if len(ids) != n:
        raise ValueError(f"task {task}: {n} predictions but {len(ids)} record ids")
    ids = [f"{r} (task {task})" for r in ids]
    predictions = [protocol_answer(task, p, protocol, end_of_turn) if isinstance(p, str) else p for p in predictions]
    for name, values in (("instructions", instructions), ("groups", groups)):
        if values is not None and len(values) != n:
            raise ValueError(f"task {task}: {n} predictions but {len(values)} {name}")

    metric_set = spec.metric_set
    if metric_set == "molecule":
        for prediction, reference, record in zip(predictions, references, ids):
            _as_text(prediction, "prediction", record)
            _as_text(reference, "reference", record)
        result = molecule_metrics(predictions, references, protocol, ids)
    elif metric_set == "homolumo_mae":
        if groups is None:
            if instructions is None:
                raise ValueError(f"task {task}: homolumo needs groups= (HOMO/LUMO/gap per record) or instructions=")
            groups = [homolumo_property(_as_text(q, "instruction", r), r) for q, r in zip(instructions, ids)]
        result = homolumo_metrics(predictions, references, protocol, ids, groups)
    elif metric_set == "number_mae":
        result = number_in_text_metrics(task, predictions, references, protocol, ids)
    elif metric_set == "yield_r2":
        result = yield_metrics(predictions, references, protocol, ids, groups)
    elif metric_set in ("caption", "procedure"):
        result = text_metrics(predictions, references, protocol, ids, tokenize_fn, wordnet,
                              levenshtein_shares=metric_set == "procedure", end_of_turn=end_of_turn)
    else:
        raise ValueError(f"task {task}: no evaluation for metric set {metric_set!r}")
    missing = [m for m in METRIC_SETS[metric_set] if m not in result]
    if missing:
        raise RuntimeError(f"task {task}: metric set {metric_set!r} lacks {missing}")
    return {key: (int(value) if key in COUNT_KEYS else float(value)) for key, value in result.items()}


def compute_task_metrics_both(task: str, predictions: Sequence[str], references: Sequence[Reference],
                              **kwargs) -> dict[str, dict[str, float]]:
    """{'reference': ..., 'strict': ...} for one task."""
    return {protocol: compute_task_metrics(task, predictions, references, protocol, **kwargs)
            for protocol in PROTOCOLS}


def compute_metrics_from_records(task: str, records: Sequence[Mapping[str, Any]],
                                 protocols: Sequence[str] = PROTOCOLS, **kwargs) -> dict[str, dict[str, float]]:
    """Metrics from prediction records as `report.PredictionStore` keeps them: each a mapping with
    'id', 'prediction', 'reference' and optionally 'raw' (the answer decoded with special tokens kept, read by
    the reference protocol; see eval/answers.py), 'instruction' (homolumo) and 'group' (homolumo
    property / yield dataset)."""
    for i, record in enumerate(records):
        for key in ("prediction", "reference"):
            if key not in record:
                raise KeyError(f"task {task}: prediction record {record.get('id', i)!r} has no {key!r} field")
    if any("group" in r for r in records):
        kwargs.setdefault("groups", [r.get("group") for r in records])
    if any("instruction" in r for r in records):
        kwargs.setdefault("instructions", [r.get("instruction", "") for r in records])
    kwargs.setdefault("record_ids", [r.get("id", i) for i, r in enumerate(records)])
    references = [r["reference"] for r in records]
    return {protocol: compute_task_metrics(task, record_answers(records, protocol)[0], references, protocol,
                                           **kwargs)
            for protocol in protocols}

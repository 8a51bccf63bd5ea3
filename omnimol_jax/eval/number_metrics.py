"""Number-output metrics: homolumo MAE (per property and overall), MAE on the first number of a text
answer (weight, logp, tpsa, complexity, scf) and R^2 for yields (per dataset, e.g. BH and SM).

Output formats (from the public Omni-Mol data and code):

- homolumo: every record asks for ONE property; the answer is a bare number in hartree (e.g.
  '-0.2482'). Which property (HOMO, LUMO or the gap) comes from the instruction, with the public
  rule: 'HOMO' without 'LUMO' -> HOMO, 'LUMO' without 'HOMO' -> LUMO, both -> gap (callers may give the
  property directly instead). A prediction parses when Python's float() accepts the whole text after
  stripping surrounding whitespace, as `float(pred)` in the public `compute_mae`; 'nan'/'inf' count as
  unparseable. The same bare-number parser serves yields (`compute_r2`).
- weight / logp / tpsa / complexity / scf: a sentence; the first number in it is the answer.
  reference protocol: the public regexes: r'\\d+(?:\\.\\d+)?' for weight, logp, tpsa and complexity
  (`compute_extracted_mae`: the minus sign is dropped, so '-1.5' reads as 1.5 on both sides, and
  '1e-3' reads as 1), and the signed r'[+-]?\\d+(?:\\.\\d+)?(?:[eE][+-]?\\d+)?' for scf
  (`compute_extracted_SCF_mae`, which keeps the sign).
  strict protocol: the signed pattern with exponents and leading-dot decimals for every task, with
  the Unicode minus sign read as '-'.

Unparseable predictions: skipped in the reference protocol (valid-only denominators, as the public
code does). In the strict protocol they stay in the denominator: the failed prediction is replaced by
the mean of the OTHER references of its group (property / yield dataset; leave-one-out, so the answer
itself never leaks in), i.e. it is scored as a no-information constant guess. A reference that does not parse
is bad input: ValueError naming the record, in both protocols.
"""
from __future__ import annotations

import math
import re
from typing import Callable, Optional, Sequence

import numpy as np

from omnimol_jax.eval.mol_metrics import PROTOCOL_REFERENCE, PROTOCOL_STRICT, check_protocol

Number = int | float

UNSIGNED_NUMBER = re.compile(r"\d+(?:\.\d+)?")  # public compute_extracted_mae: drops the sign
SIGNED_NUMBER_SCF = re.compile(r"[+-]?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")  # public compute_extracted_SCF_mae
SIGNED_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")  # strict protocol

HOMO, LUMO, GAP = "homo", "lumo", "gap"
HOMOLUMO_PROPERTIES = (HOMO, LUMO, GAP)
_PROPERTY_ALIASES = {"homo": HOMO, "lumo": LUMO, "gap": GAP, "homo-lumo gap": GAP, "homo_lumo_gap": GAP,
                     "homo-lumo-gap": GAP, "homolumo gap": GAP}


def parse_bare_number(text: str | Number) -> Optional[float]:
    """float(text) as the public code calls it, or None; non-finite values are unparseable."""
    if isinstance(text, bool):
        return None
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def first_number(text: str | Number, pattern: re.Pattern) -> Optional[float]:
    """The first match of `pattern` in the text as a float, or None."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        text = str(text)
    if not isinstance(text, str):
        return None
    match = pattern.search(text.replace("\u2212", "-") if pattern is SIGNED_NUMBER else text)
    if match is None:
        return None
    value = float(match.group(0))
    return value if math.isfinite(value) else None


def number_in_text_parser(task: str, protocol: str) -> Callable[[str | Number], Optional[float]]:
    """The first-number parser a number-in-text task uses under a protocol."""
    check_protocol(protocol)
    if protocol == PROTOCOL_STRICT:
        pattern = SIGNED_NUMBER
    else:
        pattern = SIGNED_NUMBER_SCF if task == "scf" else UNSIGNED_NUMBER
    return lambda text: first_number(text, pattern)


def homolumo_property(instruction: str, record: str = "?") -> str:
    """HOMO / LUMO / gap from the question text, with the public code's rule."""
    has_homo, has_lumo = "HOMO" in instruction, "LUMO" in instruction
    if has_homo and has_lumo:
        return GAP
    if has_homo:
        return HOMO
    if has_lumo:
        return LUMO
    raise ValueError(f"record {record}: cannot tell which property the homolumo instruction asks for "
                     f"(neither 'HOMO' nor 'LUMO' in {instruction[:120]!r}); pass groups= explicitly")


def normalize_property(label: str, record: str = "?") -> str:
    key = str(label).strip().lower()
    if key in _PROPERTY_ALIASES:
        return _PROPERTY_ALIASES[key]
    raise ValueError(f"record {record}: unknown homolumo property {label!r}; expected HOMO, LUMO or gap")


def _parse_references(references: Sequence, parser, record_ids: Sequence[str]) -> list[float]:
    values = []
    for reference, record in zip(references, record_ids):
        value = parser(reference)
        if value is None:
            raise ValueError(f"record {record}: the reference {str(reference)[:120]!r} holds no usable number")
        values.append(value)
    return values


def _paired_values(predictions: Sequence, references: Sequence, parser, protocol: str,
                   record_ids: Sequence[str], groups: Sequence[str]):
    """(prediction values, reference values, group labels, n_failed) of the records a protocol scores."""
    targets = _parse_references(references, parser, record_ids)
    parsed = [parser(p) for p in predictions]
    n_failed = sum(v is None for v in parsed)
    if protocol == PROTOCOL_REFERENCE:
        keep = [i for i, v in enumerate(parsed) if v is not None]
        return ([parsed[i] for i in keep], [targets[i] for i in keep], [groups[i] for i in keep], n_failed)
    # A failure scores as a no-information guess: the mean of the OTHER references of its group (else of all
    # other references, else 0). Leaving the record out matters: with few records per group, the group mean
    # would contain the answer itself.
    filled = [v if v is not None else _leave_one_out_mean(targets, groups, i) for i, v in enumerate(parsed)]
    return filled, targets, list(groups), n_failed


def _leave_one_out_mean(targets: Sequence[float], groups: Sequence[str], index: int) -> float:
    same = [t for j, (t, g) in enumerate(zip(targets, groups)) if j != index and g == groups[index]]
    if same:
        return float(np.mean(same))
    others = [t for j, t in enumerate(targets) if j != index]
    return float(np.mean(others)) if others else 0.0


def mean_absolute_error(predictions: Sequence[float], targets: Sequence[float]) -> float:
    if not predictions:
        return float("nan")
    return float(np.mean(np.abs(np.asarray(predictions, np.float64) - np.asarray(targets, np.float64))))


def r2_score(predictions: Sequence[float], targets: Sequence[float]) -> float:
    """Coefficient of determination as sklearn's r2_score computes it (NaN for < 2 records; a constant
    target gives 1.0 for a perfect prediction, else 0.0)."""
    if len(predictions) < 2:
        return float("nan")
    y = np.asarray(targets, np.float64)
    residual = float(np.sum((y - np.asarray(predictions, np.float64)) ** 2))
    total = float(np.sum((y - y.mean()) ** 2))
    if total == 0.0:
        return 1.0 if residual == 0.0 else 0.0
    return 1.0 - residual / total


def _counts(n: int, n_failed: int) -> dict[str, float]:
    return {"n": n, "n_valid": n - n_failed, "n_failed": n_failed}


def homolumo_metrics(predictions: Sequence, references: Sequence, protocol: str, record_ids: Sequence[str],
                     properties: Sequence[str]) -> dict[str, float]:
    """MAE per property (mae_homo, mae_lumo, mae_gap) and over all records (mae), in hartree."""
    check_protocol(protocol)
    labels = [normalize_property(p, r) for p, r in zip(properties, record_ids)]
    preds, targets, kept_labels, n_failed = _paired_values(predictions, references, parse_bare_number, protocol,
                                                           record_ids, labels)
    metrics: dict[str, float] = {}
    for prop in HOMOLUMO_PROPERTIES:
        idx = [i for i, g in enumerate(kept_labels) if g == prop]
        metrics[f"mae_{prop}"] = mean_absolute_error([preds[i] for i in idx], [targets[i] for i in idx])
    metrics["mae"] = mean_absolute_error(preds, targets)
    metrics.update(_counts(len(predictions), n_failed))
    return metrics


def number_in_text_metrics(task: str, predictions: Sequence, references: Sequence, protocol: str,
                           record_ids: Sequence[str]) -> dict[str, float]:
    """MAE on the first number of each answer."""
    parser = number_in_text_parser(task, protocol)
    groups = ["all"] * len(predictions)
    preds, targets, _, n_failed = _paired_values(predictions, references, parser, protocol, record_ids, groups)
    return {"mae": mean_absolute_error(preds, targets), **_counts(len(predictions), n_failed)}


def yield_metrics(predictions: Sequence, references: Sequence, protocol: str, record_ids: Sequence[str],
                  datasets: Optional[Sequence[str]]) -> dict[str, float]:
    """R^2 per yield dataset (r2_<dataset>, e.g. r2_BH, r2_SM) and `r2`: the R^2 itself when there is a
    single dataset, else the unweighted mean of the per-dataset values (R^2 pooled over BH and SM would
    mostly measure the difference between the two datasets' yield distributions)."""
    check_protocol(protocol)
    groups = [str(g) for g in datasets] if datasets is not None else ["all"] * len(predictions)
    preds, targets, kept_groups, n_failed = _paired_values(predictions, references, parse_bare_number, protocol,
                                                           record_ids, groups)
    metrics: dict[str, float] = {}
    per_dataset = []
    names = sorted(set(groups))
    for name in names:
        idx = [i for i, g in enumerate(kept_groups) if g == name]
        value = r2_score([preds[i] for i in idx], [targets[i] for i in idx])
        per_dataset.append(value)
        if datasets is not None:
            metrics[f"r2_{name}"] = value
    if len(per_dataset) == 1:
        metrics["r2"] = per_dataset[0]
    else:
        finite = [v for v in per_dataset if not math.isnan(v)]
        metrics["r2"] = float(np.mean(finite)) if len(finite) == len(per_dataset) else float("nan")
    metrics.update(_counts(len(predictions), n_failed))
    return metrics

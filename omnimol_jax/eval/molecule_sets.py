"""Metrics of a task's predicted molecules as a set, as molecule-generation papers report them (MOSES, GuacaMol,
MolT5): on top of the per-record molecule metrics (mol_metrics.py), for Mol2Mol and Text2Mol tasks.

    uniqueness  distinct canonical SMILES / valid predictions
    novelty     valid distinct predictions absent from the task's training answers / valid distinct predictions
    fcd         Fréchet ChemNet Distance between the valid predictions and the test references (the `fcd` package
                and the ChemNet weights it ships; MolT5's convention: both sides as canonical SMILES)

Canonical SMILES follow the protocol (stereo-blind in the reference protocol, isomeric in the strict one);
predictions that decode to no atom count as invalid here in both protocols (they have no SMILES to compare). FCD
needs at least two valid predictions; with fewer, or without the `fcd` package (pip install fcd==1.2.2), it is NaN.
A few dozen molecules give a noisy FCD (a 512-dimensional covariance from few samples): compare it between models
on the same test records only.
"""
from __future__ import annotations

import functools
import logging
from typing import Iterable, Optional, Sequence

import numpy as np

from omnimol_jax.eval.mol_metrics import parse_selfies

logger = logging.getLogger(__name__)



def canonical_molecules(selfies_texts: Iterable[str], protocol: str) -> list[str]:
    """Canonical SMILES of each text that decodes to a molecule with at least one atom (others are left out)."""
    out = []
    for text in selfies_texts:
        parsed = parse_selfies(text, protocol)
        if parsed.valid and parsed.mol.GetNumAtoms() > 0:
            out.append(parsed.canonical_smiles)
    return out


@functools.lru_cache(maxsize=1)
def _chemnet():
    try:
        from fcd import load_ref_model
    except ImportError:
        return None
    return load_ref_model()


def frechet_chemnet_distance(predicted: Sequence[str], references: Sequence[str]) -> float:
    """FCD between two lists of SMILES (NaN with fewer than two on either side or without the fcd package)."""
    if len(predicted) < 2 or len(references) < 2:
        return float("nan")
    model = _chemnet()
    if model is None:
        logger.warning("FCD not computed: pip install fcd==1.2.2 (it ships ChemNet's weights)")
        return float("nan")
    from fcd import get_fcd

    return float(get_fcd(list(predicted), list(references), model, device="cpu"))


def molecule_set_metrics(predictions: Sequence[str], references: Sequence[str], train_answers: Optional[set[str]],
                         protocol: str) -> dict[str, float]:
    """uniqueness, novelty (NaN without `train_answers`: the canonical SMILES of the training split's answers under
    the same protocol) and FCD of SELFIES predictions against SELFIES references."""
    valid = canonical_molecules(predictions, protocol)
    distinct = set(valid)
    uniqueness = len(distinct) / len(valid) if valid else float("nan")
    if train_answers is None or not distinct:
        novelty = float("nan")
    else:
        novelty = len(distinct - train_answers) / len(distinct)
    fcd = frechet_chemnet_distance(valid, canonical_molecules(references, protocol))
    if not np.isfinite(fcd):
        fcd = float("nan")
    return {"uniqueness": uniqueness, "novelty": novelty, "fcd": fcd}

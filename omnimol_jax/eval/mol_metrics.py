"""Molecule-output metrics (forward, reagent, retrosynthesis, solvent, catalyst, molediting, iupac,
textguidedmolgen): SELFIES -> SMILES -> RDKit, then validity, exact match via InChI, BLEU on SELFIES
characters, Levenshtein on canonical SMILES, and MACCS / RDKit / Morgan(r=2) Tanimoto similarity.

Two protocols (docs/omnimol.md §6):

reference  the public Omni-Mol code (`metric_factory.calc_mol_trans` + `calc_fingerprints`, from MolT5):
           both sides canonicalised with isomericSmiles=False (stereo-blind); a prediction is valid when
           `selfies.decoder` succeeds and RDKit parses the SMILES. That includes a SELFIES that decodes
           to the empty string (e.g. '' or text without any '[...]' symbol): RDKit parses '' as a
           0-atom molecule, which the public code counts as valid. Exact match, BLEU, Levenshtein
           and the three similarities are averaged over the VALID predictions only; validity is
           n_valid / n.
strict     stereo kept (isomeric canonical SMILES; standard InChI has the stereo layers, so L- and
           D-alanine differ); a prediction is valid only if it decodes to a molecule with at least one
           atom; every score is over ALL records, an invalid prediction counting as a failure: exact
           match 0, each similarity 0, Levenshtein = length of the target's canonical SMILES (the cost
           of writing it from nothing), and its raw SELFIES characters still enter the corpus BLEU.

Common to both (as in the public code): predictions are used verbatim (a trailing space or newline
makes `selfies.decoder` fail, a leading space is ignored by it), BLEU is NLTK's corpus BLEU-4 on the
characters of the raw SELFIES, Levenshtein is the unit-cost edit distance, MACCS and RDKit (path <= 7,
2048 bits) fingerprints are bit vectors, and the Morgan fingerprint is the count-based sparse one
(`AllChem.GetMorganFingerprint(m, 2)`, here through the equivalent `GetSparseCountFingerprint`) with
count Tanimoto. Fingerprints ignore chirality in both protocols (RDKit's defaults).

A reference that does not decode to a molecule with at least one atom is bad input: ValueError naming
the record (the public code would crash or mis-score it).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np
import selfies
from rdkit import Chem, DataStructs
from rdkit.Chem import MACCSkeys, rdFingerprintGenerator
from rdkit.rdBase import BlockLogs

from omnimol_jax.eval.text_metrics import BLEU4_WEIGHTS, corpus_bleu, levenshtein_distance

PROTOCOL_REFERENCE = "reference"
PROTOCOL_STRICT = "strict"
PROTOCOLS = (PROTOCOL_REFERENCE, PROTOCOL_STRICT)


_MORGAN = rdFingerprintGenerator.GetMorganGenerator(radius=2)


def check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")


@dataclasses.dataclass(frozen=True)
class ParsedMolecule:
    """A SELFIES string after decoding: its canonical SMILES under a protocol, or why it failed."""

    selfies: str
    canonical_smiles: Optional[str]  # None when invalid under the protocol
    mol: Optional[Chem.Mol] = None
    failure: Optional[str] = None

    @property
    def valid(self) -> bool:
        return self.canonical_smiles is not None


def parse_selfies(text: str, protocol: str) -> ParsedMolecule:
    """Decodes one SELFIES string and canonicalises it the way `protocol` does."""
    check_protocol(protocol)
    if not isinstance(text, str):
        return ParsedMolecule(str(text), None, failure=f"not a string ({type(text).__name__})")
    try:
        smiles = selfies.decoder(text)
    except Exception as error:  # selfies raises DecoderError and, for odd input, other errors
        return ParsedMolecule(text, None, failure=f"SELFIES decoding failed ({type(error).__name__})")
    if smiles is None:
        return ParsedMolecule(text, None, failure="SELFIES decoding returned nothing")
    with BlockLogs():  # model outputs are often unparseable: keep RDKit's per-molecule errors quiet
        mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        return ParsedMolecule(text, None, failure="RDKit cannot parse the decoded SMILES")
    if protocol == PROTOCOL_STRICT and mol.GetNumAtoms() == 0:
        return ParsedMolecule(text, None, failure="decodes to an empty molecule")
    canonical = Chem.MolToSmiles(mol, isomericSmiles=protocol == PROTOCOL_STRICT, canonical=True)
    # The public code re-parses its canonical SMILES for InChI and fingerprints; doing the same keeps
    # the stereo-blind molecule free of the stereo flags the input carried.
    with BlockLogs():
        canonical_mol = Chem.MolFromSmiles(canonical)
    if canonical_mol is None:
        return ParsedMolecule(text, None, failure="RDKit cannot re-parse its own canonical SMILES")
    return ParsedMolecule(text, canonical, canonical_mol)


def mol_to_inchi(mol: Chem.Mol) -> str:
    try:
        with BlockLogs():
            return Chem.MolToInchi(mol) or ""
    except Exception:  # InChI generation can fail on exotic valences; such a molecule matches nothing
        return ""


def fingerprints(mol: Chem.Mol) -> tuple:
    """(MACCS keys, RDKit path fingerprint, Morgan r=2 count fingerprint) of a molecule."""
    return MACCSkeys.GenMACCSKeys(mol), Chem.RDKFingerprint(mol), _MORGAN.GetSparseCountFingerprint(mol)


_FINGERPRINTS: dict[str, tuple] = {}
_FINGERPRINT_CACHE_SIZE = 16384


def cached_fingerprints(parsed: "ParsedMolecule") -> tuple:
    """Fingerprints keyed by canonical SMILES (equal SMILES, equal fingerprints): a target, and often a prediction,
    recurs across the two protocols, and fingerprinting is most of the molecule metrics' time."""
    found = _FINGERPRINTS.get(parsed.canonical_smiles)
    if found is None:
        if len(_FINGERPRINTS) >= _FINGERPRINT_CACHE_SIZE:
            _FINGERPRINTS.pop(next(iter(_FINGERPRINTS)))  # oldest first
        found = _FINGERPRINTS[parsed.canonical_smiles] = fingerprints(parsed.mol)
    return found


def tanimoto_similarities(pred: Chem.Mol, target: Chem.Mol) -> tuple[float, float, float]:
    """(MACCS, RDKit, Morgan count) Tanimoto similarity."""
    return _tanimoto(fingerprints(pred), fingerprints(target))


def _tanimoto(pred: tuple, target: tuple) -> tuple[float, float, float]:
    return tuple(float(DataStructs.TanimotoSimilarity(t, p)) for t, p in zip(target, pred))


@dataclasses.dataclass(frozen=True)
class MoleculeRecordScore:
    valid: bool
    exact: float
    levenshtein: float
    maccs: float
    rdk: float
    morgan: float
    failure: Optional[str]


def score_molecule_record(prediction: str, target: ParsedMolecule, protocol: str) -> MoleculeRecordScore:
    """Per-record scores of one prediction against an already parsed (valid) target."""
    parsed = parse_selfies(prediction, protocol)
    if not parsed.valid:
        return MoleculeRecordScore(False, 0.0, float(len(target.canonical_smiles)), 0.0, 0.0, 0.0, parsed.failure)
    target_inchi = mol_to_inchi(target.mol)
    exact = float(bool(target_inchi) and mol_to_inchi(parsed.mol) == target_inchi)
    maccs, rdk, morgan = _tanimoto(cached_fingerprints(parsed), cached_fingerprints(target))
    distance = levenshtein_distance(parsed.canonical_smiles, target.canonical_smiles)
    return MoleculeRecordScore(True, exact, float(distance), maccs, rdk, morgan, None)


def parse_target(reference: str, protocol: str, record: str) -> ParsedMolecule:
    parsed = parse_selfies(reference, protocol)
    if not parsed.valid or parsed.mol.GetNumAtoms() == 0:
        reason = parsed.failure or "decodes to an empty molecule"
        raise ValueError(f"record {record}: the reference SELFIES {str(reference)[:120]!r} is not a molecule "
                         f"({reason})")
    return parsed


def molecule_metrics(predictions: Sequence[str], references: Sequence[str], protocol: str,
                     record_ids: Sequence[str]) -> dict[str, float]:
    """Aggregate molecule metrics; see the module docstring for the two protocols."""
    check_protocol(protocol)
    n = len(predictions)
    scores: list[MoleculeRecordScore] = []
    for prediction, reference, record in zip(predictions, references, record_ids):
        target = parse_target(reference, protocol, record)
        scores.append(score_molecule_record(prediction, target, protocol))
    valid = [s.valid for s in scores]
    n_valid = int(sum(valid))
    if protocol == PROTOCOL_REFERENCE:
        kept = [i for i in range(n) if valid[i]]
    else:
        kept = list(range(n))

    def mean_of(field: str) -> float:
        return float(np.mean([getattr(scores[i], field) for i in kept])) if kept else float("nan")

    bleu = (corpus_bleu([[list(references[i])] for i in kept], [list(predictions[i]) for i in kept],
                        BLEU4_WEIGHTS) if kept else float("nan"))
    return {
        "validity": n_valid / n if n else float("nan"),
        "exact_match": mean_of("exact"),
        "bleu": float(bleu),
        "levenshtein": mean_of("levenshtein"),
        "maccs_fts": mean_of("maccs"),
        "rdk_fts": mean_of("rdk"),
        "morgan_fts": mean_of("morgan"),
        "n": n,
        "n_valid": n_valid,
        "n_failed": n - n_valid,
    }

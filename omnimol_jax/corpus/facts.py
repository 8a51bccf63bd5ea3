"""Computed facts of a molecule (functional groups, rings, counts), the texts made from them, and orbital energies."""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Optional, Sequence

import numpy as np
from rdkit import Chem, rdBase
from rdkit.Chem import AllChem, Crippen, Descriptors, GraphDescriptors, rdMolDescriptors

from omnimol_jax.corpus.pool import PoolMolecule
from omnimol_jax.corpus.settings import HARTREE_PER_EV

logger = logging.getLogger(__name__)


# (name used in text, SMARTS); specific groups before the general ones they overlap with.
FUNCTIONAL_GROUPS: tuple[tuple[str, str], ...] = (
    ("carboxylic acid", "[CX3](=O)[OX2H1,OX1-]"),
    ("ester", "[#6][CX3](=O)[OX2H0][#6]"),
    ("amide", "[NX3][CX3](=[OX1])[#6]"),
    ("urea", "[NX3][CX3](=[OX1])[NX3]"),
    ("carbamate", "[NX3][CX3](=[OX1])[OX2][#6]"),
    ("sulfonamide", "[SX4](=[OX1])(=[OX1])[NX3]"),
    ("sulfone", "[#6][SX4](=[OX1])(=[OX1])[#6]"),
    ("ketone", "[#6][CX3](=O)[#6]"),
    ("aldehyde", "[CX3H1](=O)[#6,#1]"),
    ("nitrile", "[CX2]#[NX1]"),
    ("nitro group", "[$([NX3](=O)=O),$([NX3+](=O)[O-])]"),
    ("primary amine", "[NX3;H2;!$(NC=[O,S,N]);!$(N-a)]"),
    ("secondary amine", "[NX3;H1;!$(NC=[O,S,N]);!$(N-a);!a]([#6])[#6]"),
    ("tertiary amine", "[NX3;H0;!$(NC=[O,S,N]);!$(N-a);!a]([#6])([#6])[#6]"),
    ("aromatic amine", "[NX3;!$(NC=[O,S,N]);$(N-a);!a]"),
    ("phenol", "[OX2H1]c"),
    ("alcohol", "[OX2H1][CX4]"),
    ("ether", "[OD2;!$(OC=O)]([#6])[#6]"),
    ("thioether", "[SX2;!$(S=*)]([#6])[#6]"),
    ("thiol", "[SX2H1]"),
    ("alkene", "[CX3]=[CX3]"),
    ("alkyne", "[CX2]#[CX2]"),
    ("fluorine atom", "[F]"),
    ("chlorine atom", "[Cl]"),
    ("bromine atom", "[Br]"),
    ("iodine atom", "[I]"),
    ("phosphate group", "P(=O)(O)O"),
)
_GROUP_PATTERNS = [(name, Chem.MolFromSmarts(smarts)) for name, smarts in FUNCTIONAL_GROUPS]


@dataclasses.dataclass(frozen=True)
class MoleculeFacts:
    formula: str
    mol_weight: float
    logp: float
    tpsa: float
    bertz: float
    hbd: int
    hba: int
    rings: int
    aromatic_rings: int
    stereocentres: int
    rotatable_bonds: int
    heavy_atoms: int
    groups: tuple[tuple[str, int], ...]  # (group, count) in FUNCTIONAL_GROUPS order


def molecule_facts(mol: Chem.Mol) -> MoleculeFacts:
    groups = []
    for name, pattern in _GROUP_PATTERNS:
        count = len(mol.GetSubstructMatches(pattern))
        if count:
            groups.append((name, count))
    stereo = len(Chem.FindMolChiralCenters(mol, includeUnassigned=True, useLegacyImplementation=False))
    return MoleculeFacts(
        formula=rdMolDescriptors.CalcMolFormula(mol), mol_weight=Descriptors.MolWt(mol), logp=Crippen.MolLogP(mol),
        tpsa=rdMolDescriptors.CalcTPSA(mol), bertz=GraphDescriptors.BertzCT(mol),
        hbd=rdMolDescriptors.CalcNumHBD(mol), hba=rdMolDescriptors.CalcNumHBA(mol),
        rings=rdMolDescriptors.CalcNumRings(mol), aromatic_rings=rdMolDescriptors.CalcNumAromaticRings(mol),
        stereocentres=stereo, rotatable_bonds=rdMolDescriptors.CalcNumRotatableBonds(mol),
        heavy_atoms=mol.GetNumHeavyAtoms(), groups=tuple(groups))


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _join(items: Sequence[str]) -> str:
    if not items:
        return ""
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _article(word: str) -> str:
    # "a urea", "an ester": by sound, and "u" in these group names sounds like "you"
    return "an" if word[0] in "aeio" else "a"


def _groups_text(facts: MoleculeFacts) -> str:
    parts = []
    for name, count in facts.groups:
        parts.append(f"{_article(name)} {name}" if count == 1 else f"{count} {name}s")
    return _join(parts)


def _size_word(heavy_atoms: int) -> str:
    return "small" if heavy_atoms <= 12 else "medium-sized" if heavy_atoms <= 30 else "large"


def _ring_text(facts: MoleculeFacts) -> str:
    if facts.rings == 0:
        return "It is acyclic"
    if facts.aromatic_rings == 0:
        return f"It has {_plural(facts.rings, 'ring')}, none of them aromatic"
    if facts.aromatic_rings == facts.rings:
        return f"It has {_plural(facts.rings, 'ring')}, all aromatic" if facts.rings > 1 else \
            "It has 1 ring, which is aromatic"
    return f"It has {_plural(facts.rings, 'ring')}, {facts.aromatic_rings} of them aromatic"


def caption(molecule: PoolMolecule, facts: MoleculeFacts) -> str:
    """A template description from computed facts (and ChEMBL's name/approval year for approved drugs)."""
    sentences = [f"The molecule is a {_size_word(facts.heavy_atoms)} organic compound with the molecular formula "
                 f"{facts.formula}."]
    groups = _groups_text(facts)
    sentences.append(f"It contains {groups}." if groups else "It contains none of the common functional groups.")
    sentences.append(_ring_text(facts) + ".")
    if facts.stereocentres:
        sentences.append(f"It has {_plural(facts.stereocentres, 'stereocentre')}.")
    sentences.append(f"It has {_plural(facts.hbd, 'hydrogen bond donor')} and "
                     f"{_plural(facts.hba, 'hydrogen bond acceptor')}.")
    if molecule.drug_name:
        year = f", first approved in {molecule.approval_year}" if molecule.approval_year else ""
        sentences.append(f"It is the approved drug {molecule.drug_name}{year}.")
    return " ".join(sentences)


DQA_QUESTIONS: tuple[tuple[str, str], ...] = (
    ("groups", "What functional groups does this molecule contain?"),
    ("rings", "How many rings does this molecule have, and how many of them are aromatic?"),
    ("hbonds", "How many hydrogen bond donors and acceptors does this molecule have?"),
    ("lipinski", "Does this molecule satisfy Lipinski's rule of five?"),
    ("formula", "What is the molecular formula of this molecule?"),
    ("stereo", "How many stereocentres does this molecule have?"),
    ("rotatable", "How flexible is this molecule, judged by its rotatable bonds?"),
)


def dqa_answer(kind: str, facts: MoleculeFacts) -> str:
    if kind == "groups":
        groups = _groups_text(facts)
        return f"The molecule contains {groups}." if groups else \
            "The molecule contains none of the common functional groups."
    if kind == "rings":
        return _ring_text(facts).replace("It ", "The molecule ", 1) + "."
    if kind == "hbonds":
        return (f"The molecule has {_plural(facts.hbd, 'hydrogen bond donor')} and "
                f"{_plural(facts.hba, 'hydrogen bond acceptor')}.")
    if kind == "lipinski":
        violations = [text for bad, text in (
            (facts.mol_weight > 500, "its molecular weight is above 500"),
            (facts.logp > 5, "its LogP is above 5"),
            (facts.hbd > 5, "it has more than 5 hydrogen bond donors"),
            (facts.hba > 10, "it has more than 10 hydrogen bond acceptors")) if bad]
        summary = (f"molecular weight {facts.mol_weight:.1f}, LogP {facts.logp:.2f}, "
                   f"{_plural(facts.hbd, 'donor')} and {_plural(facts.hba, 'acceptor')}")
        if not violations:
            return f"Yes. It violates none of the rules ({summary})."
        return f"It violates {_plural(len(violations), 'rule')}: {_join(violations)} ({summary})."
    if kind == "formula":
        return f"The molecular formula is {facts.formula}."
    if kind == "stereo":
        if facts.stereocentres == 0:
            return "The molecule has no stereocentres."
        return f"The molecule has {_plural(facts.stereocentres, 'stereocentre')}."
    if kind == "rotatable":
        level = "rigid" if facts.rotatable_bonds <= 3 else "moderately flexible" if facts.rotatable_bonds <= 8 \
            else "flexible"
        return f"The molecule is {level}: it has {_plural(facts.rotatable_bonds, 'rotatable bond')}."
    raise ValueError(f"unknown question kind {kind!r}")


def eht_orbitals(smiles: str, seed: int) -> Optional[tuple[float, float]]:
    """(HOMO, LUMO) in hartree from extended Hueckel on one ETKDGv3 conformer; None if embedding/EHT fails."""
    from rdkit.Chem import rdEHTTools  # local: only homolumo needs it

    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    params = AllChem.ETKDGv3()
    params.randomSeed = int(seed % (2 ** 31 - 1))
    params.numThreads = 1
    with rdBase.BlockLogs():
        if AllChem.EmbedMolecule(mol, params) != 0:
            return None
        ok, result = rdEHTTools.RunMol(mol)
    if not ok:
        return None
    energies = np.asarray(result.GetOrbitalEnergies())
    occupied = result.numElectrons // 2
    if result.numElectrons % 2 or occupied < 1 or occupied >= len(energies):
        return None  # radicals / no virtual orbital: HOMO/LUMO not defined the usual way
    return float(energies[occupied - 1] * HARTREE_PER_EV), float(energies[occupied] * HARTREE_PER_EV)


def eht_worker_init() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)  # errors still reach the parent: the executor pickles exceptions back


def eht_job(job: tuple[str, int]) -> Optional[tuple[float, float]]:
    return eht_orbitals(*job)

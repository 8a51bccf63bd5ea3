"""SMILES / SELFIES -> molecule graph arrays (RDKit), in the two feature layouts the graph tower knows.

Feature modes (column i of the node/edge features indexes embedding table i of the GIN):

`omnimol` (what the released MoleculeSTM / Omni-Mol checkpoints saw)
    atoms: [atomic_num - 1 (the wildcard '*', atomic number 0, -> 118), chiral tag 0..3]
    bonds: [type single/double/triple/aromatic = 0..3, direction none/endupright/enddownright = 0..2]
    The bond direction lands in the second OGB bond table (the *stereo* table, 6 rows).

`ogb` (OGB `atom_to_feature_vector` / `bond_to_feature_vector`, ogb 1.2 table sizes)
    atoms: atomic_num, chirality, total degree, formal charge, total H count, radical electrons,
           hybridization, aromatic, in ring -> table sizes (119, 4, 12, 12, 10, 6, 6, 2, 2)
    bonds: type, stereo, conjugated -> table sizes (5, 6, 2)
    Out-of-list values go to the last ("misc") row, as OGB's `safe_index` does.

Graphs: heavy atoms only (RDKit's default hydrogen removal on parsing), every bond stored in both
directions (i->j then j->i), no self loops. A multi-component SMILES ('A.B') is one graph whose atoms
are A's then B's.

Values that neither the Omni-Mol code nor OGB define (they would crash there) get a fixed, documented
row instead of an exception: non-tetrahedral chiral tags (RDKit's CHI_TETRAHEDRAL, CHI_ALLENE,
CHI_SQUAREPLANAR, ...) -> 3 (CHI_OTHER); bond types other than the four -> 4 (the OGB "misc" row);
wedge/dash/unknown bond directions (mol-block drawing hints, not SMILES '/' '\\') -> 0 (none); atropisomer
bond stereo -> 5 (STEREOANY).
"""
from __future__ import annotations

import dataclasses
from typing import Literal, Optional, Sequence

import numpy as np
import selfies
from rdkit import Chem, rdBase
from rdkit.Chem import rdchem

from omnimol_jax.constants import FEATURE_MODES, NUM_ATOM_FEATURES, NUM_BOND_FEATURES

FeatureMode = Literal["omnimol", "ogb"]

WILDCARD_ATOM_INDEX = 118  # the '*' atom (atomic number 0); also OGB's "misc" atomic-number row

_CHIRAL_TAG_INDEX = {
    rdchem.ChiralType.CHI_UNSPECIFIED: 0,
    rdchem.ChiralType.CHI_TETRAHEDRAL_CW: 1,
    rdchem.ChiralType.CHI_TETRAHEDRAL_CCW: 2,
    rdchem.ChiralType.CHI_OTHER: 3,
}
_CHI_OTHER = 3

_BOND_TYPE_INDEX = {
    rdchem.BondType.SINGLE: 0,
    rdchem.BondType.DOUBLE: 1,
    rdchem.BondType.TRIPLE: 2,
    rdchem.BondType.AROMATIC: 3,
}
_BOND_TYPE_MISC = 4

_BOND_DIR_INDEX = {
    rdchem.BondDir.NONE: 0,
    rdchem.BondDir.ENDUPRIGHT: 1,
    rdchem.BondDir.ENDDOWNRIGHT: 2,
}

# OGB's stereo list order: STEREONONE, STEREOZ, STEREOE, STEREOCIS, STEREOTRANS, STEREOANY.
_BOND_STEREO_INDEX = {
    rdchem.BondStereo.STEREONONE: 0,
    rdchem.BondStereo.STEREOZ: 1,
    rdchem.BondStereo.STEREOE: 2,
    rdchem.BondStereo.STEREOCIS: 3,
    rdchem.BondStereo.STEREOTRANS: 4,
    rdchem.BondStereo.STEREOANY: 5,
}
_BOND_STEREO_ANY = 5

_HYBRIDIZATION_INDEX = {
    rdchem.HybridizationType.SP: 0,
    rdchem.HybridizationType.SP2: 1,
    rdchem.HybridizationType.SP3: 2,
    rdchem.HybridizationType.SP3D: 3,
    rdchem.HybridizationType.SP3D2: 4,
}
_HYBRIDIZATION_MISC = 5


class FeaturizationError(ValueError):
    """A molecule could not be turned into a graph. `reason` says why, `molecule` is the input string."""

    def __init__(self, reason: str, molecule: Optional[str] = None):
        self.reason = reason
        self.molecule = molecule
        super().__init__(reason if molecule is None else f"{reason}: {molecule!r}")


@dataclasses.dataclass(frozen=True)
class MolGraph:
    """One molecule graph (or several molecules as one disconnected graph).

    node_features int32 [N, F]; edge_index int32 [2, E] (row 0 senders, row 1 receivers, both directions
    of every bond); edge_features int32 [E, Fb].
    """

    node_features: np.ndarray
    edge_index: np.ndarray
    edge_features: np.ndarray

    def __post_init__(self):
        n, e = self.node_features.shape[0], self.edge_index.shape[1]
        if self.node_features.ndim != 2 or self.edge_index.shape[0] != 2 or self.edge_features.shape[0] != e:
            raise ValueError(f"inconsistent MolGraph shapes: nodes {self.node_features.shape}, "
                             f"edge_index {self.edge_index.shape}, edges {self.edge_features.shape}")
        if e and (self.edge_index.min() < 0 or self.edge_index.max() >= n):
            raise ValueError(f"edge_index refers to atoms outside [0, {n})")

    @property
    def num_nodes(self) -> int:
        return int(self.node_features.shape[0])

    @property
    def num_edges(self) -> int:
        return int(self.edge_index.shape[1])


def _check_mode(mode: str) -> None:
    if mode not in FEATURE_MODES:
        raise ValueError(f"unknown feature mode {mode!r}; expected one of {FEATURE_MODES}")


def atom_features(atom: Chem.Atom, mode: FeatureMode = "omnimol") -> list[int]:
    atomic_num = atom.GetAtomicNum()
    # Atomic numbers 1..118 -> rows 0..117; the wildcard (0) -> 118 (Omni-Mol), the OGB "misc" row too.
    atomic_index = atomic_num - 1 if 1 <= atomic_num <= 118 else WILDCARD_ATOM_INDEX
    chiral_index = _CHIRAL_TAG_INDEX.get(atom.GetChiralTag(), _CHI_OTHER)
    if mode == "omnimol":
        return [atomic_index, chiral_index]
    degree = atom.GetTotalDegree()
    charge = atom.GetFormalCharge()
    num_hs = atom.GetTotalNumHs()
    radicals = atom.GetNumRadicalElectrons()
    return [
        atomic_index,
        chiral_index,
        degree if 0 <= degree <= 10 else 11,
        charge + 5 if -5 <= charge <= 5 else 11,
        num_hs if 0 <= num_hs <= 8 else 9,
        radicals if 0 <= radicals <= 4 else 5,
        _HYBRIDIZATION_INDEX.get(atom.GetHybridization(), _HYBRIDIZATION_MISC),
        int(atom.GetIsAromatic()),
        int(atom.IsInRing()),
    ]


def bond_features(bond: Chem.Bond, mode: FeatureMode = "omnimol") -> list[int]:
    type_index = _BOND_TYPE_INDEX.get(bond.GetBondType(), _BOND_TYPE_MISC)
    if mode == "omnimol":
        return [type_index, _BOND_DIR_INDEX.get(bond.GetBondDir(), 0)]
    return [
        type_index,
        _BOND_STEREO_INDEX.get(bond.GetStereo(), _BOND_STEREO_ANY),
        int(bond.GetIsConjugated()),
    ]


def mol_to_graph(mol: Chem.Mol, mode: FeatureMode = "omnimol") -> MolGraph:
    """Graph arrays of an RDKit molecule as parsed (hydrogens stay implicit unless the mol carries them)."""
    _check_mode(mode)
    num_atoms, num_bonds = mol.GetNumAtoms(), mol.GetNumBonds()
    if num_atoms == 0:
        raise FeaturizationError("the molecule has no atoms", Chem.MolToSmiles(mol))
    # Index access is much faster than iterating RDKit's GetAtoms()/GetBonds() sequence wrappers.
    nodes = np.asarray([atom_features(mol.GetAtomWithIdx(i), mode) for i in range(num_atoms)], dtype=np.int32)
    if num_bonds == 0:
        return MolGraph(nodes, np.zeros((2, 0), np.int32), np.zeros((0, NUM_BOND_FEATURES[mode]), np.int32))
    bonds = [mol.GetBondWithIdx(i) for i in range(num_bonds)]
    ends = np.asarray([(b.GetBeginAtomIdx(), b.GetEndAtomIdx()) for b in bonds], dtype=np.int32)  # [B, 2]
    per_bond = np.asarray([bond_features(b, mode) for b in bonds], dtype=np.int32)  # [B, Fb]
    # Interleave i->j and j->i per bond, the order of OGB / Omni-Mol `smiles2graph`.
    senders = np.stack([ends[:, 0], ends[:, 1]], axis=1).reshape(-1)
    receivers = np.stack([ends[:, 1], ends[:, 0]], axis=1).reshape(-1)
    return MolGraph(nodes, np.stack([senders, receivers]), np.repeat(per_bond, 2, axis=0))


def parse_smiles(smiles: str) -> Chem.Mol:
    """RDKit molecule from SMILES with default sanitization; FeaturizationError with RDKit's reason."""
    if not isinstance(smiles, str):
        raise FeaturizationError(f"expected a SMILES string, got {type(smiles).__name__}")
    if not smiles.strip():
        raise FeaturizationError("empty SMILES", smiles)
    with rdBase.BlockLogs():
        mol = Chem.MolFromSmiles(smiles)
        if mol is None:
            raise FeaturizationError(_diagnose_smiles(smiles), smiles)
    if mol.GetNumAtoms() == 0:
        raise FeaturizationError("the molecule has no atoms", smiles)
    return mol


def _diagnose_smiles(smiles: str) -> str:
    """Why RDKit rejected a SMILES (called only on failure, with logs already blocked)."""
    raw = Chem.MolFromSmiles(smiles, sanitize=False)
    if raw is None:
        return "RDKit cannot parse the SMILES (syntax error)"
    problems = Chem.DetectChemistryProblems(raw)
    if problems:
        return "RDKit rejects the molecule: " + "; ".join(p.Message() for p in problems)
    return "RDKit cannot sanitize the molecule"


def selfies_to_smiles(selfies_string: str) -> str:
    """SELFIES -> SMILES with the `selfies` package; FeaturizationError on bad or empty input."""
    if not isinstance(selfies_string, str):
        raise FeaturizationError(f"expected a SELFIES string, got {type(selfies_string).__name__}")
    if not selfies_string.strip():
        raise FeaturizationError("empty SELFIES", selfies_string)
    try:
        smiles = selfies.decoder(selfies_string)
    except selfies.DecoderError as error:
        raise FeaturizationError(f"invalid SELFIES ({str(error).splitlines()[0]})", selfies_string) from None
    if not smiles:
        raise FeaturizationError("the SELFIES decodes to an empty molecule", selfies_string)
    return smiles


def smiles_to_graph(smiles: str, mode: FeatureMode = "omnimol") -> MolGraph:
    return mol_to_graph(parse_smiles(smiles), mode)


def selfies_to_graph(selfies_string: str, mode: FeatureMode = "omnimol") -> MolGraph:
    return smiles_to_graph(selfies_to_smiles(selfies_string), mode)


def merge_graphs(graphs: Sequence[MolGraph]) -> MolGraph:
    """Several graphs as one disconnected graph, atoms in the given order (like joining SMILES with '.')."""
    if not graphs:
        raise ValueError("merge_graphs needs at least one graph")
    if len(graphs) == 1:
        return graphs[0]
    offsets = np.cumsum([0] + [g.num_nodes for g in graphs[:-1]])
    return MolGraph(
        node_features=np.concatenate([g.node_features for g in graphs]),
        edge_index=np.concatenate([g.edge_index + o for g, o in zip(graphs, offsets)], axis=1).astype(np.int32),
        edge_features=np.concatenate([g.edge_features for g in graphs]),
    )

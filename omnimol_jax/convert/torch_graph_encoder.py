"""The graph side of an exported Omni-Mol model in plain PyTorch (no torch_geometric), for use with transformers.

`omnimol export-hf` of a full model writes `graph_encoder.safetensors` (the MoleculeSTM GIN and the projector)
and `graph_encoder.json` beside the language model. `GraphEncoder.from_pretrained(folder)` reads them; it turns a
molecule (SMILES or SELFIES, featurised exactly as training did) into one projected vector per heavy atom, and
`inputs_embeds` splices those vectors into the graph slots of a prompt (token id IMAGE_TOKEN_ID, one per atom,
as `omnimol_jax.data.prompts` builds prompts) for `model(inputs_embeds=...)` or `model.generate(...)`:

    encoder = GraphEncoder.from_pretrained("exported")
    model = AutoModelForCausalLM.from_pretrained("exported")
    embeds = encoder.inputs_embeds(model, input_ids, ["[C][C][O]"])  # one molecule (or None) per row
    logits = model(inputs_embeds=embeds, attention_mask=mask).logits

The GIN computes docs/omnimol.md §1 (batch norms in eval mode, message passing as an `index_add_` over receivers).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from omnimol_jax.constants import GRAPH_ENCODER_CONFIG, GRAPH_ENCODER_FILE, IMAGE_TOKEN_ID


class FeatureEmbedding(nn.Module):
    """Sum of one embedding row per feature column (OGB AtomEncoder / BondEncoder)."""

    def __init__(self, sizes: Sequence[int], dim: int, list_name: str):
        super().__init__()
        self.list_name = list_name
        setattr(self, list_name, nn.ModuleList([nn.Embedding(size, dim) for size in sizes]))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        tables = getattr(self, self.list_name)
        return sum(tables[column](features[:, column]) for column in range(features.shape[1]))


class GINConv(nn.Module):
    def __init__(self, dim: int, bond_sizes: Sequence[int], eps: float):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.BatchNorm1d(2 * dim, eps=eps), nn.ReLU(),
                                 nn.Linear(2 * dim, dim))
        self.eps = nn.Parameter(torch.zeros(1))
        self.bond_encoder = FeatureEmbedding(bond_sizes, dim, "bond_embedding_list")

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, edge_features: torch.Tensor) -> torch.Tensor:
        messages = torch.relu(x[edge_index[0]] + self.bond_encoder(edge_features))  # from the sender ...
        aggregated = torch.zeros_like(x).index_add_(0, edge_index[1], messages)  # ... summed at the receiver
        return self.mlp((1 + self.eps) * x + aggregated)


class GIN(nn.Module):
    def __init__(self, graph: dict):
        super().__init__()
        dim, eps = graph["hidden_size"], graph["batch_norm_eps"]
        self.atom_encoder = FeatureEmbedding(graph["atom_feature_dims"], dim, "atom_embedding_list")
        self.gnns = nn.ModuleList([GINConv(dim, graph["bond_feature_dims"], eps) for _ in range(graph["num_layers"])])
        self.batch_norms = nn.ModuleList([nn.BatchNorm1d(dim, eps=eps) for _ in range(graph["num_layers"])])

    def forward(self, nodes: torch.Tensor, edge_index: torch.Tensor, edge_features: torch.Tensor) -> torch.Tensor:
        h = self.atom_encoder(nodes)
        for layer, (conv, norm) in enumerate(zip(self.gnns, self.batch_norms)):
            h = norm(conv(h, edge_index, edge_features))
            if layer != len(self.gnns) - 1:
                h = torch.relu(h)
        return h


class GraphEncoder(nn.Module):
    """GIN -> projector: molecules to the language model's per-atom input vectors."""

    def __init__(self, meta: dict, model_dim: int):
        super().__init__()
        self.graph_config = meta["graph"]
        self.projector_layers = list(meta["projector_layers"])
        self.graph_tower = GIN(self.graph_config)
        dim = self.graph_config["hidden_size"]
        self.projector = nn.Module()
        for i, name in enumerate(self.projector_layers):
            setattr(self.projector, name, nn.Linear(dim if i == 0 else model_dim, model_dim))

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "GraphEncoder":
        from safetensors.torch import load_file

        folder = Path(folder)
        for name in (GRAPH_ENCODER_FILE, GRAPH_ENCODER_CONFIG):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder / name} is missing (written by `omnimol export-hf` of a full model)")
        meta = json.loads((folder / GRAPH_ENCODER_CONFIG).read_text())
        state = load_file(str(folder / GRAPH_ENCODER_FILE))
        model_dim = state[f"projector.{meta['projector_layers'][0]}.weight"].shape[0]
        encoder = cls(meta, model_dim)
        missing, unexpected = encoder.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise ValueError(f"{folder / GRAPH_ENCODER_FILE}: missing {missing[:8]}, unexpected {unexpected[:8]}")
        return encoder.eval()

    def featurize(self, molecule: str):
        """A SELFIES or SMILES string (components joined by '.') -> MolGraph, read as `omnimol generate` reads a
        molecule input, in the feature mode the model was trained with."""
        from omnimol_jax.data.molecules import graph_for, input_as_selfies

        return graph_for("input", input_as_selfies("input", molecule), mode=self.graph_config["feature_mode"])

    def forward(self, graph) -> torch.Tensor:
        """[atoms, model_dim]: the projected vector of every heavy atom of one MolGraph."""
        h = self.graph_tower(torch.from_numpy(np.asarray(graph.node_features, np.int64)),
                             torch.from_numpy(np.asarray(graph.edge_index, np.int64)),
                             torch.from_numpy(np.asarray(graph.edge_features, np.int64)))
        for i, name in enumerate(self.projector_layers):
            h = getattr(self.projector, name)(h if i == 0 else nn.functional.silu(h))
        return h

    @torch.no_grad()
    def inputs_embeds(self, model, input_ids: torch.Tensor, molecules: Sequence[Optional[str]]) -> torch.Tensor:
        """The token embeddings of `input_ids` [B, S] with the graph slots of row b filled, in order, by the atoms
        of molecules[b] (None: a text-only row, which must have no slot)."""
        embeddings = model.get_input_embeddings()(input_ids.clamp(min=0))
        out = embeddings.clone()
        for row, molecule in enumerate(molecules):
            slots = (input_ids[row] == IMAGE_TOKEN_ID).nonzero().squeeze(-1)
            atoms = None if molecule is None else self(self.featurize(molecule))
            count = 0 if atoms is None else atoms.shape[0]
            if slots.numel() != count:
                raise ValueError(f"row {row}: {slots.numel()} graph slots but {count} atoms")
            if count:
                out[row, slots] = atoms.to(out.dtype)
        return out

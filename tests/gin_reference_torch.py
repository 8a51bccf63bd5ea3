"""A plain-torch GIN that computes the graph tower exactly as docs/omnimol.md §1 states, with the
MoleculeSTM module names (so its state dict looks like `molecule_model.pth`). No torch_geometric:
message passing is an `index_add_` over the receivers.
"""
from __future__ import annotations

import torch
from torch import nn

ATOM_DIMS = (119, 4, 12, 12, 10, 6, 6, 2, 2)
BOND_DIMS = (5, 6, 2)


class FeatureEncoder(nn.Module):
    def __init__(self, dims, emb_dim, list_name):
        super().__init__()
        tables = nn.ModuleList([nn.Embedding(d, emb_dim) for d in dims])
        for table in tables:
            nn.init.xavier_uniform_(table.weight)
        setattr(self, list_name, tables)
        self.list_name = list_name

    def forward(self, features):
        tables = getattr(self, self.list_name)
        return sum(tables[i](features[:, i]) for i in range(features.shape[1]))


class GINConv(nn.Module):
    def __init__(self, emb_dim):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(emb_dim, 2 * emb_dim), nn.BatchNorm1d(2 * emb_dim), nn.ReLU(),
                                 nn.Linear(2 * emb_dim, emb_dim))
        self.eps = nn.Parameter(torch.zeros(1))
        self.bond_encoder = FeatureEncoder(BOND_DIMS, emb_dim, "bond_embedding_list")

    def forward(self, x, edge_index, edge_attr):
        edge_embedding = self.bond_encoder(edge_attr)
        messages = torch.relu(x[edge_index[0]] + edge_embedding)  # from sender u (x_j) ...
        aggregated = torch.zeros_like(x).index_add_(0, edge_index[1], messages)  # ... summed at receiver v
        return self.mlp((1 + self.eps) * x + aggregated)


class GNN(nn.Module):
    def __init__(self, num_layer=5, emb_dim=300):
        super().__init__()
        self.num_layer = num_layer
        self.atom_encoder = FeatureEncoder(ATOM_DIMS, emb_dim, "atom_embedding_list")
        self.gnns = nn.ModuleList([GINConv(emb_dim) for _ in range(num_layer)])
        self.batch_norms = nn.ModuleList([nn.BatchNorm1d(emb_dim) for _ in range(num_layer)])

    def forward(self, x, edge_index, edge_attr):
        h = self.atom_encoder(x)
        for layer in range(self.num_layer):
            h = self.batch_norms[layer](self.gnns[layer](h, edge_index, edge_attr))
            if layer != self.num_layer - 1:
                h = torch.relu(h)
        return h


class GNNGraphPred(nn.Module):
    """The wrapper whose state dict is MoleculeSTM's `molecule_model.pth`."""

    def __init__(self, num_layer=5, emb_dim=300):
        super().__init__()
        self.molecule_node_model = GNN(num_layer, emb_dim)
        self.graph_pred_linear = nn.Linear(emb_dim, 1)

    def forward(self, x, edge_index, edge_attr):
        return self.molecule_node_model(x, edge_index, edge_attr)


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial batch-norm statistics/affines and eps, so every term of the formula matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm1d):
                n = module.num_features
                module.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
                module.weight.copy_(0.5 + torch.rand(n, generator=generator))
                module.bias.copy_(0.1 * torch.randn(n, generator=generator))
                module.num_batches_tracked.fill_(1000)
            if isinstance(module, GINConv):
                module.eps.copy_(0.2 * torch.randn(1, generator=generator))
    return model.eval()

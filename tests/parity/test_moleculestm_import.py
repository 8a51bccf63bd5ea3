"""Import of MoleculeSTM torch state dicts (molecule_model.pth naming) into the NNX GIN."""
import collections

import numpy as np
import pytest
import torch
from flax import nnx
from gin_reference_torch import GNN, GNNGraphPred, randomize_

from omnimol_jax.config import GraphConfig
from omnimol_jax.convert import moleculestm as C
from omnimol_jax.model.gin import GIN

SMALL = GraphConfig(num_layers=2, hidden_size=16)


class ArbitraryObject:
    """Unpickling this would run arbitrary code paths; weights_only loading must refuse it."""


def reference_model(seed=0):
    torch.manual_seed(seed)
    return randomize_(GNNGraphPred(num_layer=SMALL.num_layers, emb_dim=SMALL.hidden_size), seed=seed)


def save(state_dict, path):
    torch.save(collections.OrderedDict(state_dict), path)
    return path


def test_molecule_model_pth_round_trip(tmp_path):
    reference = reference_model()
    state = reference.state_dict()
    assert any("graph_pred_linear" in k for k in state) and any("num_batches_tracked" in k for k in state)
    path = save(state, tmp_path / "molecule_model.pth")
    gin = C.load_moleculestm(GIN(SMALL, rngs=nnx.Rngs(1)), path)
    node = reference.molecule_node_model
    np.testing.assert_array_equal(gin.atom_encoder.embeddings[3][...],
                                  node.atom_encoder.atom_embedding_list[3].weight.detach().numpy())
    np.testing.assert_array_equal(gin.gnns[1].mlp_in.kernel[...], node.gnns[1].mlp[0].weight.detach().numpy().T)
    np.testing.assert_array_equal(gin.gnns[1].mlp_out.kernel[...], node.gnns[1].mlp[3].weight.detach().numpy().T)
    np.testing.assert_array_equal(gin.gnns[0].mlp_norm.var[...], node.gnns[0].mlp[1].running_var.numpy())
    np.testing.assert_array_equal(gin.batch_norms[1].mean[...], node.batch_norms[1].running_mean.numpy())
    np.testing.assert_array_equal(gin.gnns[0].bond_encoder.embeddings[1][...],
                                  node.gnns[0].bond_encoder.bond_embedding_list[1].weight.detach().numpy())
    assert gin.gnns[1].eps[...].shape == () and float(gin.gnns[1].eps[...]) == node.gnns[1].eps.item()
    assert node.gnns[1].eps.item() != 0.0
    # Export gives back the same tensors under the same names (graph_pred_linear aside).
    exported = C.gin_to_moleculestm(gin)
    expected = {k: v.numpy() for k, v in state.items() if "graph_pred_linear" not in k}
    assert set(exported) == set(expected)
    for key, value in expected.items():
        if not key.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_omnimol_and_bare_prefixes(tmp_path):
    reference = reference_model(seed=3)
    node_state = reference.molecule_node_model.state_dict()
    # Omni-Mol: the tower sits under graph_tower.gnn.molecule_node_model; other parts of the file are ignored.
    omnimol = {f"graph_tower.gnn.{k}": v for k, v in reference.state_dict().items()}
    omnimol["mm_projector.weight.weight"] = torch.zeros(4, SMALL.hidden_size)
    gin = C.load_moleculestm(GIN(SMALL, rngs=nnx.Rngs(0)), save(omnimol, tmp_path / "omnimol.bin"))
    np.testing.assert_array_equal(gin.gnns[0].mlp_in.bias[...], node_state["gnns.0.mlp.0.bias"].numpy())
    # A bare GNN state dict (no wrapper prefix).
    bare_model = GNN(SMALL.num_layers, SMALL.hidden_size)
    bare_model.load_state_dict(node_state)
    gin = C.load_moleculestm(GIN(SMALL, rngs=nnx.Rngs(0)), save(bare_model.state_dict(), tmp_path / "gnn.pth"))
    np.testing.assert_array_equal(gin.batch_norms[0].scale[...], node_state["batch_norms.0.weight"].numpy())


def test_mismatches_are_listed_together_with_the_file_name(tmp_path):
    state = reference_model().state_dict()
    del state["molecule_node_model.gnns.1.mlp.3.bias"]
    state["molecule_node_model.gnns.0.mlp.0.weight"] = torch.zeros(7, SMALL.hidden_size)
    state["molecule_node_model.atom_encoder.atom_embedding_list.1.weight"] = torch.zeros(5, SMALL.hidden_size)
    state["molecule_node_model.gnns.0.extra_gate.weight"] = torch.zeros(3)
    path = save(state, tmp_path / "broken_molecule_model.pth")
    with pytest.raises(C.MoleculeSTMImportError) as info:
        C.load_moleculestm(GIN(SMALL, rngs=nnx.Rngs(0)), path)
    message = str(info.value)
    assert str(path) in message
    assert "missing keys (1): molecule_node_model.gnns.1.mlp.3.bias" in message
    assert "unexpected keys (1): molecule_node_model.gnns.0.extra_gate.weight" in message
    assert "shape mismatches (2)" in message
    assert "molecule_node_model.gnns.0.mlp.0.weight: file [7, 16], model expects [32, 16]" in message
    assert "atom_embedding_list.1.weight: file [5, 16], model expects [4, 16]" in message


def test_a_model_of_another_size_is_rejected():
    state = {k: v.numpy() for k, v in reference_model().state_dict().items()}
    with pytest.raises(C.MoleculeSTMImportError) as info:
        C.load_moleculestm(GIN(GraphConfig(num_layers=3, hidden_size=16), rngs=nnx.Rngs(0)), state)
    assert "missing keys (" in str(info.value) and "gnns.2.mlp.0.weight" in str(info.value)


def test_unsafe_or_malformed_files_are_refused(tmp_path):
    gin = GIN(SMALL, rngs=nnx.Rngs(0))
    with pytest.raises(C.MoleculeSTMImportError, match="no such file"):
        C.load_moleculestm(gin, tmp_path / "absent.pth")
    pickled = tmp_path / "pickled_object.pth"
    torch.save({"model": ArbitraryObject()}, pickled)  # not loadable with weights_only=True
    with pytest.raises(C.MoleculeSTMImportError, match="weights-only"):
        C.load_moleculestm(gin, pickled)
    nested = tmp_path / "nested.pth"
    torch.save({"state_dict": {"a": torch.zeros(1)}}, nested)
    with pytest.raises(C.MoleculeSTMImportError, match="flat state dict"):
        C.load_moleculestm(gin, nested)

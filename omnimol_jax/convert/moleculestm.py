"""Import (and export) of MoleculeSTM graph-tower weights for `omnimol_jax.model.gin.GIN`.

Assumed checkpoint naming (from the MoleculeSTM / Omni-Mol `molecule_gnn_model.py`, OGB-style GINConv):
`molecule_model.pth` is the state dict of `GNN_graphpred`, whose node model `molecule_node_model` is a
`GNN(num_layer=5, emb_dim=300, JK="last", gnn_type="gin")`:

    molecule_node_model.atom_encoder.atom_embedding_list.{i}.weight           [119|4|12|12|10|6|6|2|2, 300]
    molecule_node_model.gnns.{l}.eps                                          [1]
    molecule_node_model.gnns.{l}.bond_encoder.bond_embedding_list.{k}.weight  [5|6|2, 300]
    molecule_node_model.gnns.{l}.mlp.0.{weight [600, 300], bias}              Linear 300 -> 600
    molecule_node_model.gnns.{l}.mlp.1.{weight, bias, running_mean, running_var, num_batches_tracked}
    molecule_node_model.gnns.{l}.mlp.3.{weight [300, 600], bias}              Linear 600 -> 300
    molecule_node_model.batch_norms.{l}.{weight, bias, running_mean, running_var, num_batches_tracked}
    graph_pred_linear.{weight, bias}                                          dropped (the pretraining head)

Accepted prefixes before `atom_encoder...`: `molecule_node_model.` (MoleculeSTM), `graph_tower.gnn.
molecule_node_model.` (Omni-Mol checkpoints, docs/omnimol.md §7; keys outside `graph_tower.` are ignored
there), `gnn.molecule_node_model.`, or none (a bare `GNN` state dict). `num_batches_tracked` is ignored
(inference batch norm does not use it). Torch Linear weights [out, in] are transposed to kernels [in, out].
Files are read with `torch.load(path, map_location="cpu", weights_only=True)` only.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from omnimol_jax.config import GraphConfig
from omnimol_jax.convert import torch_files
from omnimol_jax.errors import InputError
from omnimol_jax.model.gin import GIN

KNOWN_PREFIXES: tuple[str, ...] = ("graph_tower.gnn.molecule_node_model.", "gnn.molecule_node_model.",
                                   "molecule_node_model.", "")
DROPPED_KEY_PARTS: tuple[str, ...] = ("graph_pred_linear",)
IGNORED_KEY_SUFFIXES: tuple[str, ...] = ("num_batches_tracked",)
_ANCHOR = "atom_encoder.atom_embedding_list.0.weight"

Path = tuple[str | int, ...]


class MoleculeSTMImportError(InputError):
    """The checkpoint does not match the GIN; lists every missing, unexpected and mis-shaped key."""


def _bn_entries(torch_prefix: str, path: Path) -> dict[str, tuple[Path, bool]]:
    return {f"{torch_prefix}.weight": (path + ("scale",), False), f"{torch_prefix}.bias": (path + ("bias",), False),
            f"{torch_prefix}.running_mean": (path + ("mean",), False),
            f"{torch_prefix}.running_var": (path + ("var",), False)}


def moleculestm_key_map(config: GraphConfig = GraphConfig()) -> dict[str, tuple[Path, bool]]:
    """torch key (without prefix) -> (path of the GIN variable, transpose?)."""
    table: dict[str, tuple[Path, bool]] = {}
    for i in range(len(config.atom_feature_dims)):
        table[f"atom_encoder.atom_embedding_list.{i}.weight"] = (("atom_encoder", "embeddings", i), False)
    for l in range(config.num_layers):
        conv: Path = ("gnns", l)
        table[f"gnns.{l}.eps"] = (conv + ("eps",), False)
        for k in range(len(config.bond_feature_dims)):
            table[f"gnns.{l}.bond_encoder.bond_embedding_list.{k}.weight"] = (conv + ("bond_encoder", "embeddings", k),
                                                                              False)
        table[f"gnns.{l}.mlp.0.weight"] = (conv + ("mlp_in", "kernel"), True)
        table[f"gnns.{l}.mlp.0.bias"] = (conv + ("mlp_in", "bias"), False)
        table.update(_bn_entries(f"gnns.{l}.mlp.1", conv + ("mlp_norm",)))
        table[f"gnns.{l}.mlp.3.weight"] = (conv + ("mlp_out", "kernel"), True)
        table[f"gnns.{l}.mlp.3.bias"] = (conv + ("mlp_out", "bias"), False)
        table.update(_bn_entries(f"batch_norms.{l}", ("batch_norms", l)))
    return table


def _variable_at(module: nnx.Module, path: Path) -> nnx.Variable:
    node: Any = module
    for part in path:
        node = node[part] if isinstance(part, int) else getattr(node, part)
    return node


def read_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A torch state dict file as numpy arrays (floating tensors as float32), loaded with weights_only=True."""
    try:
        return torch_files.read_state_dict(path, float32=True)
    except torch_files.TorchFileError as error:
        raise MoleculeSTMImportError(str(error)) from None


def _detect_prefix(keys: list[str]) -> str:
    for prefix in KNOWN_PREFIXES:
        if prefix + _ANCHOR in keys:
            return prefix
    for key in keys:  # any other wrapper around the same module
        if key.endswith(_ANCHOR):
            return key[: -len(_ANCHOR)]
    return "molecule_node_model."


def gin_params_from_moleculestm(state_dict: Mapping[str, Any], config: GraphConfig = GraphConfig(), *,
                                source: str = "<state dict>") -> dict[Path, np.ndarray]:
    """GIN variable path -> array (transposed/reshaped to the GIN's layout), or MoleculeSTMImportError."""
    keys = list(state_dict)
    prefix = _detect_prefix(keys)
    scope = "graph_tower." if prefix.startswith("graph_tower.") else ""
    table = moleculestm_key_map(config)
    expected_shapes = _expected_shapes(config)
    params: dict[Path, np.ndarray] = {}
    unexpected, mismatched, seen = [], [], set()
    for key in keys:
        if any(part in key for part in DROPPED_KEY_PARTS) or key.endswith(IGNORED_KEY_SUFFIXES):
            continue
        if not key.startswith(prefix):
            if key.startswith(scope):
                unexpected.append(key)
            continue
        name = key[len(prefix):]
        if name not in table:
            unexpected.append(key)
            continue
        seen.add(name)
        path, transpose = table[name]
        value = np.asarray(state_dict[key])
        value = value.T if transpose and value.ndim == 2 else value
        want = expected_shapes[path]
        if want == () and value.shape == (1,):  # torch keeps eps as a 1-element tensor
            value = value.reshape(())
        if value.shape != want:
            shown = np.asarray(state_dict[key]).shape
            mismatched.append(f"{key}: file {list(shown)}, model expects "
                              f"{list(want[::-1]) if transpose else list(want)}")
            continue
        params[path] = value.astype(np.float32)
    missing = [prefix + name for name in table if name not in seen]
    if missing or unexpected or mismatched:
        parts = [f"{source}: the MoleculeSTM checkpoint does not match the GIN "
                 f"({config.num_layers} layers x {config.hidden_size}; key prefix {prefix!r})"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): " + ", ".join(missing))
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(unexpected))
        if mismatched:
            parts.append(f"shape mismatches ({len(mismatched)}): " + "; ".join(mismatched))
        raise MoleculeSTMImportError("\n".join(parts))
    return params


def _expected_shapes(config: GraphConfig) -> dict[Path, tuple[int, ...]]:
    abstract = nnx.eval_shape(lambda: GIN(config, rngs=nnx.Rngs(0)))
    return {path: tuple(_variable_at(abstract, path).get_value().shape)
            for path, _ in moleculestm_key_map(config).values()}


def load_moleculestm(gin: GIN, checkpoint: str | os.PathLike | Mapping[str, Any]) -> GIN:
    """Loads a MoleculeSTM / Omni-Mol graph-tower checkpoint (file path or state dict) into `gin` in place."""
    if isinstance(checkpoint, Mapping):
        state_dict, source = checkpoint, "<state dict>"
    else:
        state_dict, source = read_torch_state_dict(checkpoint), os.fspath(checkpoint)
    params = gin_params_from_moleculestm(state_dict, gin.config, source=source)
    for path, value in params.items():
        variable = _variable_at(gin, path)
        variable.set_value(jnp.asarray(value, dtype=variable.get_value().dtype))
    return gin


def gin_to_moleculestm(gin: GIN, prefix: str = "molecule_node_model.") -> dict[str, np.ndarray]:
    """The GIN's weights in MoleculeSTM naming (torch layout), e.g. for export or parity checks."""
    out: dict[str, np.ndarray] = {}
    for name, (path, transpose) in moleculestm_key_map(gin.config).items():
        value = np.asarray(_variable_at(gin, path).get_value())
        if name.endswith(".eps"):
            value = value.reshape(1)
        out[prefix + name] = value.T if transpose else value
    for l in range(gin.config.num_layers):
        for bn in (f"gnns.{l}.mlp.1", f"batch_norms.{l}"):
            out[f"{prefix}{bn}.num_batches_tracked"] = np.zeros((), np.int64)
    return out

"""RDKit featurization (both modes) and the per-task molecule rules."""
import os

import numpy as np
import pytest
import selfies
from rdkit import Chem, RDConfig
from rdkit.Chem import rdCIPLabeler

from omnimol_jax.config import GraphConfig
from omnimol_jax.constants import OGB_ATOM_FEATURE_DIMS, OGB_BOND_FEATURE_DIMS
from omnimol_jax.data import featurize as F, molecules as M

NCI_SMILES = os.path.join(RDConfig.RDDataDir, "NCI", "first_5K.smi")


def read_nci(limit):
    with open(NCI_SMILES) as handle:
        return [line.split()[0] for _, line in zip(range(limit), handle)]


def test_table_sizes_agree_between_featurizer_and_gin():
    assert GraphConfig().atom_feature_dims == OGB_ATOM_FEATURE_DIMS == (119, 4, 12, 12, 10, 6, 6, 2, 2)
    assert GraphConfig().bond_feature_dims == OGB_BOND_FEATURE_DIMS == (5, 6, 2)


def test_l_alanine_chiral_carbon():
    smiles = "C[C@@H](C(=O)O)N"  # L-alanine, (S)-2-aminopropanoic acid
    mol = Chem.MolFromSmiles(smiles)
    rdCIPLabeler.AssignCIPLabels(mol)
    assert mol.GetAtomWithIdx(1).GetProp("_CIPCode") == "S"
    graph = F.smiles_to_graph(smiles, "omnimol")
    # Atoms: CH3, C*, C(carboxyl), =O, -OH, N. Carbon -> 6-1 = 5; '@@' -> CHI_TETRAHEDRAL_CW -> 1.
    assert graph.node_features.tolist() == [[5, 0], [5, 1], [5, 0], [7, 0], [7, 0], [6, 0]]
    ogb = F.smiles_to_graph(smiles, "ogb")
    # C*: degree 4 (3 heavy + H), charge 0 -> 5, one H, no radical, SP3 -> 2, not aromatic, not in ring.
    assert ogb.node_features[1].tolist() == [5, 1, 4, 5, 1, 0, 2, 0, 0]
    # N: degree 3 (C + 2 H), two H, SP3.
    assert ogb.node_features[5].tolist() == [6, 0, 3, 5, 2, 0, 2, 0, 0]
    # The other enantiomer flips only the chiral tag.
    assert F.smiles_to_graph("C[C@H](C(=O)O)N").node_features[1].tolist() == [5, 2]


def test_nitro_group_charges_and_aromatic_ring():
    graph = F.smiles_to_graph("O=[N+]([O-])c1ccccc1", "ogb")  # nitrobenzene, charge-separated nitro
    nodes = graph.node_features
    # N+: atomic 7 -> 6; degree 3; charge +1 -> 6; no H; SP2 -> 1; not aromatic, not in a ring.
    assert nodes[1].tolist() == [6, 0, 3, 6, 0, 0, 1, 0, 0]
    # O-: degree 1, charge -1 -> 4.
    assert nodes[2][:4].tolist() == [7, 0, 1, 4]
    # Ipso carbon: degree 3, no H, SP2, aromatic, in ring. Ring CH: one H.
    assert nodes[3].tolist() == [5, 0, 3, 5, 0, 0, 1, 1, 1]
    assert nodes[4].tolist() == [5, 0, 3, 5, 1, 0, 1, 1, 1]
    # Bonds (both directions, interleaved): N=O double conjugated, N-c single conjugated, ring aromatic.
    edges = graph.edge_features
    assert edges[0].tolist() == edges[1].tolist() == [1, 0, 1]
    assert edges[4].tolist() == [0, 0, 1]
    assert edges[6].tolist() == [3, 0, 1]
    omni = F.smiles_to_graph("O=[N+]([O-])c1ccccc1", "omnimol")
    assert omni.node_features[1].tolist() == [6, 0]  # no charge column in omnimol mode
    assert omni.edge_features[6].tolist() == [3, 0]


def test_double_bond_stereo():
    trans = F.smiles_to_graph("F/C=C/F", "omnimol")
    cis = F.smiles_to_graph("F/C=C\\F", "omnimol")
    # Bonds: F-C (dir '/' = ENDUPRIGHT -> 1), C=C (double, no direction), C-F ('/' -> 1, '\' -> ENDDOWNRIGHT -> 2).
    assert trans.edge_features[::2].tolist() == [[0, 1], [1, 0], [0, 1]]
    assert cis.edge_features[::2].tolist() == [[0, 1], [1, 0], [0, 2]]
    # OGB stereo column on the double bond: STEREOE -> 2, STEREOZ -> 1.
    assert F.smiles_to_graph("F/C=C/F", "ogb").edge_features[2].tolist() == [1, 2, 0]
    assert F.smiles_to_graph("F/C=C\\F", "ogb").edge_features[2].tolist() == [1, 1, 0]


def test_wildcard_atom():
    graph = F.smiles_to_graph("*c1ccccc1", "omnimol")
    assert graph.node_features[0].tolist() == [118, 0]
    assert F.smiles_to_graph("*c1ccccc1", "ogb").node_features[0, 0] == 118


def test_salts_are_one_graph_with_components_in_order():
    graph = F.smiles_to_graph("CC(=O)[O-].[Na+]", "omnimol")
    assert graph.num_nodes == 5 and graph.num_edges == 6  # 3 bonds x 2 directions, none to Na+
    assert graph.node_features[:, 0].tolist() == [5, 5, 7, 7, 10]
    ions = F.smiles_to_graph("[Na+].[Cl-]", "ogb")
    assert ions.num_edges == 0 and ions.edge_index.shape == (2, 0) and ions.edge_features.shape == (0, 3)
    assert ions.node_features[:, :4].tolist() == [[10, 0, 0, 6], [16, 0, 0, 4]]


def test_edges_both_directions_no_self_loops_implicit_hydrogens():
    graph = F.smiles_to_graph("OC1CCCCC1", "omnimol")
    senders, receivers = graph.edge_index
    assert graph.num_edges == 2 * 7
    assert np.all(senders != receivers)
    pairs = set(zip(senders.tolist(), receivers.tolist()))
    assert all((r, s) in pairs for s, r in pairs)
    assert senders[:2].tolist() == [0, 1] and receivers[:2].tolist() == [1, 0]
    assert F.smiles_to_graph("[H]C([H])([H])[H]").num_nodes == 1  # explicit H atoms become implicit
    assert graph.node_features.dtype == np.int32 and graph.edge_index.dtype == np.int32


@pytest.mark.parametrize("bad, reason", [
    ("C1CC", "syntax"),
    ("CC(", "syntax"),
    ("C(C)(C)(C)(C)C", "valence"),
    ("c1cccc1", "kekulize"),
    ("", "empty"),
])
def test_invalid_smiles_raise_with_reason(bad, reason):
    with pytest.raises(F.FeaturizationError) as info:
        F.smiles_to_graph(bad)
    assert reason in str(info.value).lower()
    assert info.value.molecule == bad


def test_selfies_path_and_invalid_selfies():
    smiles = "CC(=O)Oc1ccccc1C(=O)O"  # aspirin
    from_selfies = F.selfies_to_graph(selfies.encoder(smiles), "ogb")
    direct = F.smiles_to_graph(smiles, "ogb")
    np.testing.assert_array_equal(from_selfies.node_features, direct.node_features)
    np.testing.assert_array_equal(from_selfies.edge_index, direct.edge_index)
    with pytest.raises(F.FeaturizationError, match="invalid SELFIES"):
        F.selfies_to_graph("[C][Xyz]")
    with pytest.raises(F.FeaturizationError, match="empty SELFIES"):
        F.selfies_to_graph("  ")
    with pytest.raises(F.FeaturizationError, match="expected a SELFIES string"):
        F.selfies_to_graph(None)


def test_features_stay_inside_tables_and_match_rdkit_on_nci_molecules():
    atoms_seen = 0
    for smiles in read_nci(300):
        mol = Chem.MolFromSmiles(smiles)
        if mol is None:
            continue
        ogb = F.mol_to_graph(mol, "ogb")
        omni = F.mol_to_graph(mol, "omnimol")
        assert np.all(ogb.node_features < np.array(OGB_ATOM_FEATURE_DIMS))
        assert np.all(ogb.edge_features < np.array(OGB_BOND_FEATURE_DIMS))
        np.testing.assert_array_equal(omni.node_features, ogb.node_features[:, :2])
        np.testing.assert_array_equal(omni.edge_features[:, 0], ogb.edge_features[:, 0])
        charges = np.array([a.GetFormalCharge() for a in mol.GetAtoms()])
        np.testing.assert_array_equal(ogb.node_features[:, 3], np.where(np.abs(charges) <= 5, charges + 5, 11))
        np.testing.assert_array_equal(ogb.node_features[:, 8], [int(a.IsInRing()) for a in mol.GetAtoms()])
        assert ogb.num_edges == 2 * mol.GetNumBonds()
        atoms_seen += ogb.num_nodes
    assert atoms_seen > 3000


def test_merge_graphs_offsets_edges():
    a, b = F.smiles_to_graph("CCO"), F.smiles_to_graph("C=O")
    merged = F.merge_graphs([a, b])
    assert merged.num_nodes == 5 and merged.num_edges == 6
    assert merged.edge_index[:, 4:].tolist() == [[3, 4], [4, 3]]
    joined = F.smiles_to_graph("CCO.C=O")
    np.testing.assert_array_equal(merged.edge_index, joined.edge_index)
    np.testing.assert_array_equal(merged.node_features, joined.node_features)


# --------------------------------------------------------------------------------------------------
# Task rules


def sf(smiles):
    return selfies.encoder(smiles)


def canonical(smiles_list):
    return [Chem.MolToSmiles(Chem.MolFromSmiles(s)) for s in smiles_list]


REACTION = f"{sf('CCO')}.{sf('CC(=O)O')}>>{sf('CCOC(C)=O')}"  # ethanol + acetic acid >> ethyl acetate


def test_rule_names_cover_the_spec_table():
    assert set(M.GRAPH_RULES) == {"input", "first_component", "reactant_side", "product", "extracted", "none"}
    with pytest.raises(ValueError, match="unknown graph rule"):
        M.graph_smiles_for("reactants", "[C]")


def test_reaction_rules():
    assert canonical(M.graph_smiles_for("reactant_side", REACTION)) == canonical(["CCO.CC(=O)O"])
    assert canonical(M.graph_smiles_for("product", REACTION)) == canonical(["CCOC(C)=O"])
    assert M.graph_for("reactant_side", REACTION).num_nodes == 3 + 4
    assert M.graph_for("product", REACTION).num_nodes == 6
    # Retrosynthesis inputs are the product alone; reagent-style inputs without '>>' keep all components.
    assert canonical(M.graph_smiles_for("product", sf("CCOC(C)=O"))) == canonical(["CCOC(C)=O"])
    assert canonical(M.graph_smiles_for("reactant_side", f"{sf('CCO')}.{sf('O')}")) == canonical(["CCO.O"])
    with pytest.raises(F.FeaturizationError, match="exactly one '>>'"):
        M.graph_smiles_for("reactant_side", f"{sf('C')}>>{sf('O')}>>{sf('N')}")


def test_molecule_rules():
    mixture = f"{sf('c1ccccc1O')}.{sf('[Na+]')}"
    assert canonical(M.graph_smiles_for("input", mixture)) == canonical(["Oc1ccccc1.[Na+]"])
    assert M.graph_for("input", mixture).num_nodes == 8
    assert canonical(M.graph_smiles_for("first_component", mixture)) == canonical(["Oc1ccccc1"])
    assert M.graph_for("first_component", mixture).num_nodes == 7
    assert M.graph_smiles_for("none", "2,2-dimethylpropane") is None
    assert M.graph_for("none", "anything") is None
    with pytest.raises(F.FeaturizationError, match="is a reaction"):
        M.graph_smiles_for("first_component", REACTION)


def test_extracted_rule_follows_placeholder_order_and_keeps_repeats():
    record = {"extracted_molecules": {"CCO": "$1$", "c1ccccc1": "$2$", "O": "$3$"}}
    text = "Dissolve $2$ in $1$, then add $2$ and stir."
    assert M.graph_smiles_for("extracted", text, record) == ["c1ccccc1", "CCO", "c1ccccc1"]
    graph = M.graph_for("extracted", text, record)
    assert graph.num_nodes == 6 + 3 + 6
    assert graph.node_features[6:9, 0].tolist() == [5, 5, 7]
    with pytest.raises(F.FeaturizationError, match="no 'extracted_molecules'"):
        M.graph_smiles_for("extracted", text, {})
    with pytest.raises(F.FeaturizationError, match="no '\\$n\\$' placeholder"):
        M.graph_smiles_for("extracted", "no placeholders here", record)


def test_rule_errors_name_the_bad_molecule():
    with pytest.raises(F.FeaturizationError) as info:
        M.graph_for("input", "[C][Xyz]")
    assert info.value.molecule == "[C][Xyz]"

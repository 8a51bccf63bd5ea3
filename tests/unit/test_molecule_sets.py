"""Predicted molecules as a set (eval/molecule_sets.py): uniqueness and novelty on hand-counted cases, FCD from the
ChemNet weights the fcd package ships."""
import math

import pytest
import selfies

from omnimol_jax.eval.molecule_sets import canonical_molecules, frechet_chemnet_distance, molecule_set_metrics

S = selfies.encoder
ETHANOL, METHANOL, PROPANOL, BENZENE = S("CCO"), S("CO"), S("CCCO"), S("c1ccccc1")
L_ALANINE, D_ALANINE = S("C[C@@H](C(=O)O)N"), S("C[C@H](C(=O)O)N")


def test_uniqueness_and_novelty_by_hand():
    # valid: ethanol, ethanol (written differently), methanol, propanol; "[Xyz]" invalid; "" has no atom
    predictions = [ETHANOL, S("OCC"), METHANOL, PROPANOL, "[Xyz]", ""]
    train = set(canonical_molecules([ETHANOL, BENZENE], "reference"))
    got = molecule_set_metrics(predictions, [ETHANOL] * 6, train, "reference")
    assert got["uniqueness"] == pytest.approx(3 / 4)  # 3 distinct of 4 valid
    assert got["novelty"] == pytest.approx(2 / 3)  # methanol and propanol are not training answers
    assert math.isnan(molecule_set_metrics(predictions, [ETHANOL] * 6, None, "reference")["novelty"])
    # the protocols canonicalise as their other metrics do: L- and D-alanine are one molecule without stereo
    assert molecule_set_metrics([L_ALANINE, D_ALANINE], [ETHANOL] * 2, None, "reference")["uniqueness"] == 0.5
    assert molecule_set_metrics([L_ALANINE, D_ALANINE], [ETHANOL] * 2, None, "strict")["uniqueness"] == 1.0
    nothing = molecule_set_metrics(["[Xyz]"], [ETHANOL], set(), "strict")
    assert all(math.isnan(v) for v in nothing.values())


def test_fcd_is_zero_for_the_same_set_and_grows_with_the_difference():
    alcohols = ["CO", "CCO", "CCCO", "CCCCO", "CC(C)O", "CC(C)(C)O", "OCCO", "CCC(C)O"]
    aromatics = ["c1ccccc1", "Cc1ccccc1", "c1ccc2ccccc2c1", "Oc1ccccc1", "Nc1ccccc1", "c1ccncc1", "Clc1ccccc1",
                 "CCc1ccccc1"]
    same = frechet_chemnet_distance(alcohols, alcohols)
    near = frechet_chemnet_distance(alcohols[:6], alcohols[2:])
    far = frechet_chemnet_distance(alcohols, aromatics)
    assert abs(same) < 1e-3 and 0 < near < far
    assert math.isnan(frechet_chemnet_distance(["CO"], alcohols))  # a covariance needs two molecules

"""Molecule-output metrics in both protocols, on cases whose values follow by hand."""
import math

import pytest
import selfies
from rdkit import Chem

from omnimol_jax.eval.metrics import compute_task_metrics, compute_task_metrics_both
from omnimol_jax.eval.mol_metrics import parse_selfies, score_molecule_record, tanimoto_similarities

L_ALANINE = selfies.encoder("C[C@@H](C(=O)O)N")  # canonical isomeric SMILES C[C@H](N)C(=O)O
D_ALANINE = selfies.encoder("C[C@H](C(=O)O)N")  # canonical isomeric SMILES C[C@@H](N)C(=O)O
ETHANOL = "[C][C][O]"


def test_parse_selfies_protocols():
    assert parse_selfies(L_ALANINE, "reference").canonical_smiles == "CC(N)C(=O)O"
    assert parse_selfies(L_ALANINE, "strict").canonical_smiles == "C[C@H](N)C(=O)O"
    assert parse_selfies(D_ALANINE, "strict").canonical_smiles == "C[C@@H](N)C(=O)O"
    assert not parse_selfies("[Xyz]", "reference").valid
    assert not parse_selfies(ETHANOL + " ", "reference").valid  # selfies rejects a trailing space
    # '' and text without SELFIES symbols decode to '', which RDKit parses as a 0-atom molecule: valid in the
    # public code (reference), a failure in strict
    for empty in ("", "no molecule here"):
        assert parse_selfies(empty, "reference").valid
        assert parse_selfies(empty, "reference").canonical_smiles == ""
        assert not parse_selfies(empty, "strict").valid


def test_stereo_invalid_and_empty_predictions_in_both_protocols():
    predictions = [L_ALANINE, ETHANOL, "[Xyz]", ""]
    references = [D_ALANINE, ETHANOL, ETHANOL, ETHANOL]
    both = compute_task_metrics_both("forward", predictions, references)
    ref, strict = both["reference"], both["strict"]
    # reference: valid = {L-Ala (0-atom '' counts too), ethanol, ''}; stereo ignored so L == D.
    # EM 1, 1, 0 -> 2/3; Levenshtein 0, 0, len('CCO') = 3 -> 1; fingerprints 1, 1, 0 -> 2/3
    assert ref["validity"] == pytest.approx(3 / 4)
    assert ref["exact_match"] == pytest.approx(2 / 3)
    assert ref["levenshtein"] == pytest.approx(1.0)
    for key in ("maccs_fts", "rdk_fts", "morgan_fts"):
        assert ref[key] == pytest.approx(2 / 3)
    assert (ref["n"], ref["n_valid"], ref["n_failed"]) == (4, 3, 1)
    # strict: valid = {L-Ala, ethanol}; L != D (InChI /m0 vs /m1); all four records in every mean.
    # EM 0, 1, 0, 0 -> 1/4; Levenshtein C[C@H].. vs C[C@@H].. = 1, 0, 3, 3 -> 7/4;
    # fingerprints ignore chirality: 1, 1, 0, 0 -> 1/2
    assert strict["validity"] == pytest.approx(1 / 2)
    assert strict["exact_match"] == pytest.approx(1 / 4)
    assert strict["levenshtein"] == pytest.approx(7 / 4)
    for key in ("maccs_fts", "rdk_fts", "morgan_fts"):
        assert strict[key] == pytest.approx(1 / 2)
    assert (strict["n"], strict["n_valid"], strict["n_failed"]) == (4, 2, 2)


def test_selfies_character_bleu_valid_only_versus_all():
    predictions = [ETHANOL, "[C][O]", "[Xyz]"]
    references = [ETHANOL, ETHANOL, ETHANOL]
    # '[C][O]' vs '[C][C][O]' (characters): every 1..4-gram of the hypothesis occurs in the reference.
    # reference (valid only): all precisions 1, lengths 9+6 vs 9+9 -> BP = exp(1 - 18/15)
    assert compute_task_metrics("retrosynthesis", predictions, references, "reference")["bleu"] == \
        pytest.approx(math.exp(-0.2))
    # strict adds '[Xyz]' (5 chars: '[' and ']' match): p1 = 17/20, p2 = 13/17, p3 = 11/14, p4 = 9/11;
    # lengths 20 vs 27
    expected = math.exp(1 - 27 / 20) * (17 / 20 * 13 / 17 * 11 / 14 * 9 / 11) ** 0.25
    assert compute_task_metrics("retrosynthesis", predictions, references, "strict")["bleu"] == \
        pytest.approx(expected)


def test_morgan_count_tanimoto_hand_case():
    # radius-2 count fingerprints (duplicate environments dropped): CCO has CH3, CH2, OH atoms (r0), CH3-C,
    # C(C)(O), O-C (r1); CCN the same with N. Shared: CH3 r0, CH2 r0, CH3-CH2 r1 -> 3 / (6 + 6 - 3)
    ethanol, ethylamine = Chem.MolFromSmiles("CCO"), Chem.MolFromSmiles("CCN")
    assert tanimoto_similarities(ethylamine, ethanol)[2] == pytest.approx(1 / 3)
    assert tanimoto_similarities(ethanol, ethanol) == (1.0, 1.0, 1.0)


def test_multi_component_predictions_and_component_order():
    # 'A.B' and 'B.A' are the same reagent set: same canonical SMILES and InChI
    target = parse_selfies("[C][C][O].[O]", "strict")
    score = score_molecule_record("[O].[C][C][O]", target, "strict")
    assert score.valid and score.exact == 1.0 and score.levenshtein == 0.0


def test_every_molecule_task_reports_the_molecule_metric_set():
    for task in ("forward", "reagent", "retrosynthesis", "solvent", "catalyst", "molediting", "iupac",
                 "textguidedmolgen"):
        result = compute_task_metrics(task, [ETHANOL], [ETHANOL], "strict")
        assert result["exact_match"] == 1.0 and result["validity"] == 1.0 and result["bleu"] == 1.0
        assert result["levenshtein"] == 0.0


def test_all_invalid_gives_nan_in_reference_and_zero_in_strict():
    ref = compute_task_metrics("forward", ["[Xyz]"], [ETHANOL], "reference")
    assert ref["validity"] == 0.0 and math.isnan(ref["exact_match"]) and math.isnan(ref["bleu"])
    strict = compute_task_metrics("forward", ["[Xyz]"], [ETHANOL], "strict")
    assert strict["exact_match"] == 0.0 and strict["maccs_fts"] == 0.0 and strict["levenshtein"] == 3.0


def test_bad_reference_and_bad_arguments_name_the_record():
    with pytest.raises(ValueError, match=r"record rx-2 \(task forward\).*not a molecule"):
        compute_task_metrics("forward", [ETHANOL, ETHANOL], [ETHANOL, "[Xyz]"], record_ids=["rx-1", "rx-2"])
    with pytest.raises(ValueError, match="not a molecule"):
        compute_task_metrics("forward", [ETHANOL], [""], "reference")
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        compute_task_metrics("forward", [ETHANOL, ETHANOL], [ETHANOL])
    with pytest.raises(ValueError, match="unknown protocol"):
        compute_task_metrics("forward", [ETHANOL], [ETHANOL], "lenient")
    with pytest.raises(KeyError, match="unknown task"):
        compute_task_metrics("nope", [ETHANOL], [ETHANOL])
    with pytest.raises(ValueError, match="no records"):
        compute_task_metrics("forward", [], [])


def _public_recipe(predictions, references):
    """The public calc_mol_trans + calc_fingerprints (metric_factory.py, from MolT5), written out with
    NLTK's corpus_bleu, a textbook edit distance and RDKit's legacy Morgan count fingerprint."""
    bleu = pytest.importorskip("nltk.translate.bleu_score")
    import numpy as np
    from rdkit import DataStructs
    from rdkit.Chem import AllChem, MACCSkeys

    def canonical(text):
        try:
            smiles = selfies.decoder(text)
        except Exception:
            return None
        mol = Chem.MolFromSmiles(smiles)
        return None if mol is None else Chem.MolToSmiles(mol, isomericSmiles=False, canonical=True)

    def edit(a, b):
        row = list(range(len(b) + 1))
        for i, x in enumerate(a, 1):
            prev, row[0] = row[0], i
            for j, y in enumerate(b, 1):
                prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
        return row[-1]

    kept = [(p, r, canonical(p), canonical(r)) for p, r in zip(predictions, references) if canonical(p) is not None]
    exact, levs, maccs, rdk, morgan = [], [], [], [], []
    for p, r, ps, rs in kept:
        pm, rm = Chem.MolFromSmiles(ps), Chem.MolFromSmiles(rs)
        exact.append(Chem.MolToInchi(pm) == Chem.MolToInchi(rm))
        levs.append(edit(ps, rs))
        maccs.append(DataStructs.FingerprintSimilarity(MACCSkeys.GenMACCSKeys(rm), MACCSkeys.GenMACCSKeys(pm)))
        rdk.append(DataStructs.FingerprintSimilarity(Chem.RDKFingerprint(rm), Chem.RDKFingerprint(pm)))
        morgan.append(DataStructs.TanimotoSimilarity(AllChem.GetMorganFingerprint(rm, 2),
                                                     AllChem.GetMorganFingerprint(pm, 2)))
    return {"validity": len(kept) / len(predictions), "exact_match": float(np.mean(exact)),
            "bleu": bleu.corpus_bleu([[list(r)] for _, r, _, _ in kept], [list(p) for p, _, _, _ in kept]),
            "levenshtein": float(np.mean(levs)), "maccs_fts": float(np.mean(maccs)),
            "rdk_fts": float(np.mean(rdk)), "morgan_fts": float(np.mean(morgan))}


def test_reference_protocol_equals_the_public_recipe():
    smiles_pairs = [("C[C@@H](C(=O)O)N", "C[C@H](C(=O)O)N"), ("c1ccccc1O", "c1ccccc1N"), ("CCO.O", "O.CCO"),
                    ("CC(=O)Oc1ccccc1C(=O)O", "CC(=O)Oc1ccccc1C(=O)O"), ("C/C=C/C", "C/C=C\\C"),
                    ("CCCCN", "CCCCCCN"), ("O=C1CCCCC1", "OC1CCCCC1")]
    predictions = [selfies.encoder(p) for p, _ in smiles_pairs] + ["[Xyz]", "", "[C][C][O] "]
    references = [selfies.encoder(r) for _, r in smiles_pairs] + [ETHANOL] * 3
    expected = _public_recipe(predictions, references)
    got = compute_task_metrics("forward", predictions, references, "reference")
    assert {k: got[k] for k in expected} == pytest.approx(expected, rel=1e-12)

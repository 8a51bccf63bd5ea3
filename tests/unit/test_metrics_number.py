"""Number-output metrics (homolumo MAE, first-number MAE, yield R^2) in both protocols, by hand."""
import math

import pytest

from omnimol_jax.eval.metrics import compute_task_metrics, compute_task_metrics_both
from omnimol_jax.eval.number_metrics import (
    SIGNED_NUMBER,
    UNSIGNED_NUMBER,
    first_number,
    homolumo_property,
    parse_bare_number,
    r2_score,
)


def test_parsers():
    assert first_number("The LogP is -1.5.", UNSIGNED_NUMBER) == 1.5  # the public parser drops the sign
    assert first_number("The LogP is -1.5.", SIGNED_NUMBER) == -1.5
    assert first_number("LogP \u22122.25", SIGNED_NUMBER) == -2.25  # Unicode minus
    assert first_number("about 1e-3 units", UNSIGNED_NUMBER) == 1.0
    assert first_number("about 1e-3 units", SIGNED_NUMBER) == 0.001
    assert first_number("value .5", SIGNED_NUMBER) == 0.5
    assert first_number("no number", SIGNED_NUMBER) is None
    assert first_number(180.16, UNSIGNED_NUMBER) == 180.16
    assert parse_bare_number(" -0.2482\n") == -0.2482
    assert parse_bare_number("-0.2482 Hartree") is None
    assert parse_bare_number("nan") is None and parse_bare_number("inf") is None and parse_bare_number("") is None


def test_negative_logp_and_unparseable_predictions():
    predictions = ["The LogP is -1.5", "LogP: 2.0", "no number", "-0.5"]
    references = ["LogP = 1.5", "-2.0", "0.7", "-0.5"]
    both = compute_task_metrics_both("logp", predictions, references)
    # reference: unsigned -> |1.5-1.5|, |2-2|, skipped, |0.5-0.5| -> MAE 0 over 3 records
    assert both["reference"]["mae"] == 0.0
    assert (both["reference"]["n_valid"], both["reference"]["n_failed"]) == (3, 1)
    # strict: signed -> |-1.5-1.5| = 3, |2-(-2)| = 4, failure -> mean of the OTHER references
    # (1.5 - 2.0 - 0.5) / 3 = -1/3: |0.7 + 1/3|, then 0
    assert both["strict"]["mae"] == pytest.approx((3 + 4 + (0.7 + 1 / 3) + 0) / 4)
    assert both["strict"]["n_failed"] == 1


def test_scf_reference_parser_keeps_the_sign_like_the_public_code():
    predictions, references = ["-1234.5 Hartree", "1234.5"], ["SCF energy: -1234.0 Hartree", "-1234.0"]
    # public compute_extracted_SCF_mae uses a signed pattern: errors 0.5 and 2468.5
    assert compute_task_metrics("scf", predictions, references, "reference")["mae"] == pytest.approx(1234.5)
    # the same numbers under weight's unsigned parser would give 0.5 and 0.5
    assert compute_task_metrics("weight", predictions, references, "reference")["mae"] == pytest.approx(0.5)
    assert compute_task_metrics("weight", predictions, references, "strict")["mae"] == pytest.approx(1234.5)


def test_number_in_text_tasks_and_numeric_references():
    for task in ("weight", "tpsa", "complexity"):
        m = compute_task_metrics(task, ["It is 180.16 g/mol", "12"], [180.0, "The value is 10.5"], "strict")
        assert m["mae"] == pytest.approx((0.16 + 1.5) / 2)


def test_homolumo_per_property_and_overall():
    instructions = ["Please provide the HOMO energy value for this molecule.",
                    "Please provide the LUMO energy value for this molecule.",
                    "Please provide the gap between HOMO and LUMO of this molecule.",
                    "What is the HOMO energy (in Hartree) of this molecule?",
                    "What is the lowest unoccupied molecular orbital (LUMO) energy?"]
    predictions = ["-0.25", "0.05 hartree", "0.30", " -0.21\n", "0.02"]
    references = [-0.20, 0.01, "0.28", -0.23, 0.05]
    both = compute_task_metrics_both("homolumo", predictions, references, instructions=instructions)
    # errors: HOMO 0.05, LUMO unparseable, gap 0.02, HOMO 0.02, LUMO 0.03
    ref = both["reference"]
    assert ref["mae_homo"] == pytest.approx(0.035) and ref["mae_lumo"] == pytest.approx(0.03)
    assert ref["mae_gap"] == pytest.approx(0.02) and ref["mae"] == pytest.approx(0.12 / 4)
    # strict: the failed LUMO answer becomes the other LUMO reference, 0.05 -> error |0.01 - 0.05| = 0.04
    strict = both["strict"]
    assert strict["mae_homo"] == pytest.approx(0.035) and strict["mae_lumo"] == pytest.approx(0.035)
    assert strict["mae_gap"] == pytest.approx(0.02) and strict["mae"] == pytest.approx(0.16 / 5)
    assert (strict["n"], strict["n_valid"], strict["n_failed"]) == (5, 4, 1)
    # explicit property labels give the same result
    groups = ["HOMO", "LUMO", "HOMO-LUMO gap", "homo", "lumo"]
    assert compute_task_metrics("homolumo", predictions, references, "strict", groups=groups) == strict


def test_homolumo_needs_a_property_source():
    assert homolumo_property("HOMO-LUMO gap?") == "gap"
    with pytest.raises(ValueError, match="record q9"):
        homolumo_property("What is the dipole moment?", "q9")
    with pytest.raises(ValueError, match="groups= .* or instructions="):
        compute_task_metrics("homolumo", ["0.1"], [0.1])
    with pytest.raises(ValueError, match=r"record 0 \(task homolumo\).*no usable number"):
        compute_task_metrics("homolumo", ["0.1"], ["n/a"], groups=["HOMO"])


def test_yield_r2_per_dataset():
    predictions = ["10", "20", "not a number", "50", "70"]
    references = [10, 30, 50, 40, 80]
    datasets = ["BH", "BH", "BH", "SM", "SM"]
    both = compute_task_metrics_both("yield", predictions, references, groups=datasets)
    # reference BH (skip the failure): y = [10, 30], pred = [10, 20]: 1 - 100/200; SM: y = [40, 80],
    # pred = [50, 70]: 1 - 200/800
    ref = both["reference"]
    assert ref["r2_BH"] == pytest.approx(0.5) and ref["r2_SM"] == pytest.approx(0.75)
    assert ref["r2"] == pytest.approx(0.625)
    # strict BH: failure -> mean of the other BH references (10, 30) = 20: pred = [10, 20, 20],
    # y = [10, 30, 50]: 1 - (0 + 100 + 900) / 800
    strict = both["strict"]
    assert strict["r2_BH"] == pytest.approx(-0.25) and strict["r2_SM"] == pytest.approx(0.75)
    assert strict["r2"] == pytest.approx(0.25)
    # a single dataset (no groups): r2 only
    single = compute_task_metrics("yield", ["50", "70"], [40, 80], "strict")
    assert single["r2"] == pytest.approx(0.75) and "r2_SM" not in single


def test_r2_edge_cases_follow_sklearn():
    assert math.isnan(r2_score([1.0], [1.0]))
    assert r2_score([5.0, 5.0], [5.0, 5.0]) == 1.0
    assert r2_score([4.0, 6.0], [5.0, 5.0]) == 0.0
    assert r2_score([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == 1.0

"""MBR selection for number answers: the L1 medoid of the samples, hand-computed cases."""
from omnimol_jax.inference.mbr import l1_medoid, numbers_in


def test_numbers_in_reads_signs_decimals_and_exponents():
    assert numbers_in("LogP is -1.25, weight 300 g/mol, 1e-3") == (-1.25, 300.0, 1e-3)
    assert numbers_in("no numbers") == ()


def test_medoid_is_a_median_sample_not_the_mode():
    # greedy-like mode: three answers start with "1"; the median of the values is 45
    samples = ["is 10.00", "is 12.00", "is 45.00", "is 60.00", "is 70.00", "is 11.00", "is 50.00"]
    # values 10, 12, 45, 60, 70, 11, 50 -> median 45 (index 2)
    assert l1_medoid(samples) == 2


def test_medoid_compares_vectors_of_the_common_length_and_skips_unparsed():
    samples = ["HOMO -0.30 LUMO -0.10 gap 0.20", "garbage", "HOMO -0.25 LUMO -0.05 gap 0.20",
               "HOMO -0.40 LUMO 0.00 gap 0.40", "only 7"]
    # only the three 3-number samples (#0, #2, #3) compete; L1 distances by hand:
    # d(0,2)=0.05+0.05+0=0.10, d(0,3)=0.10+0.10+0.20=0.40, d(2,3)=0.15+0.05+0.20=0.40
    # cost0=0.50, cost2=0.50, cost3=0.80 -> tie broken by the earlier sample
    assert l1_medoid(samples) == 0
    assert l1_medoid(["none", "either"]) is None

"""Planned prompt lengths: top-anchored halving, sparse lengths merged into the next longer one."""
import pytest

from omnimol_jax.inference.prompt_buckets import PromptBuckets, plan_batch_lengths


def test_the_longest_batch_sets_the_top_length_rounded_to_the_multiple():
    assert PromptBuckets.plan([279], min_batches=1).lengths == (320,)
    assert PromptBuckets.plan([256], min_batches=1).lengths == (256,)
    assert PromptBuckets.plan([5], min_length=32, min_batches=1).lengths == (64,)  # a multiple of 64
    assert PromptBuckets.plan([5], min_length=200, min_batches=1).lengths == (200,)


def test_lengths_halve_from_the_top_and_keep_those_with_enough_batches():
    # a top of 320 halves to 160 -> 192 (multiples of 64), 96 -> 128, 64; half of 64 rounds back up to 64
    lengths = [279] * 4 + [200] * 4 + [150] * 4 + [100] * 4 + [40] * 4
    plan = PromptBuckets.plan(lengths, min_length=32, min_batches=4)
    assert plan.lengths == (64, 128, 192, 320)
    assert [plan.bucket_for(n) for n in (40, 64, 65, 100, 150, 192, 193, 279)] == [64, 64, 128, 128, 192, 192, 320,
                                                                                 320]


def test_sparse_lengths_hand_their_batches_to_the_next_longer():
    # the demo's eval: 11 batches within 192, 6 longer; 2 short batches join the 192 ones
    plan = PromptBuckets.plan([279] * 6 + [180] * 11 + [100] * 2, min_batches=4)
    assert plan.lengths == (192, 320) and plan.bucket_for(100) == 192
    assert PromptBuckets.plan([279] * 6 + [250] * 11 + [100] * 2, min_batches=4).lengths == (320,)
    plan = PromptBuckets.plan([279] + [180] * 11 + [100] * 2, min_batches=4)
    assert plan.lengths == (192, 320)  # the top length is kept even for one batch
    assert PromptBuckets.plan([279] + [180] * 2 + [100], min_batches=4).lengths == (320,)


def test_bad_plans_and_lengths_are_refused():
    with pytest.raises(ValueError, match="no batches"):
        PromptBuckets.plan([])
    with pytest.raises(ValueError, match=">= 1"):
        PromptBuckets.plan([0])
    with pytest.raises(ValueError, match="longer than every planned length"):
        PromptBuckets.plan([100], min_batches=1).bucket_for(129)


def test_each_group_plans_apart():
    # the demo's eval: greedy generation 13 batches within 192 and 6 longer; the number-median decoder 7 and 8.
    # Together both lengths would stay for both decoders (4 programs); apart, with 8 batches needed to keep a
    # length, the decoder with 7 short batches pads them to 320 (3 programs).
    lengths = [180] * 13 + [300] * 6 + [180] * 7 + [300] * 8
    groups = ["generate"] * 19 + ["median"] * 15
    planned = plan_batch_lengths(lengths, groups, min_batches=8)
    assert planned == [192] * 13 + [320] * 6 + [320] * 15
    assert sorted({(g, n) for g, n in zip(groups, planned)}) == [("generate", 192), ("generate", 320),
                                                                 ("median", 320)]
    with pytest.raises(ValueError, match="2 batch lengths but 1 groups"):
        plan_batch_lengths([1, 2], ["a"])

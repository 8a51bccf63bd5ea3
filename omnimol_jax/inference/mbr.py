"""Minimum-Bayes-risk selection for number answers.

Under absolute error the Bayes-optimal point estimate is the median of the predictive distribution, not its
mode. Greedy decoding of digits finds neither: it commits to the most likely *first* digit, and "1" starts
both 10-19 and 100-199, so an uncertain model answers 10.x where its samples mostly say 40-90. Drawing N
samples and answering with the medoid under L1 (the sample with the least total absolute difference to the
others; for one number this is a median sample) approximates the MAE-optimal answer while still returning
text the model generated.
"""
from __future__ import annotations

import math
import re
from typing import Optional, Sequence

NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def numbers_in(text: str) -> tuple[float, ...]:
    return tuple(float(m) for m in NUMBER_RE.findall(text))


def l1_medoid(samples: Sequence[str]) -> Optional[int]:
    """Index of the sample minimising the summed L1 distance of its numbers to the other samples' numbers.

    Samples are compared only with samples holding as many numbers (the answer format); the most common count
    wins, ties broken by the earlier sample. None when no sample holds a number."""
    parsed = [numbers_in(s) for s in samples]
    counts = [len(p) for p in parsed if p]
    if not counts:
        return None
    size = max(sorted(set(counts)), key=counts.count)
    candidates = [i for i, p in enumerate(parsed) if len(p) == size]
    best, best_cost = None, math.inf
    for i in candidates:
        cost = sum(sum(abs(a - b) for a, b in zip(parsed[i], parsed[j])) for j in candidates)
        if cost < best_cost:
            best, best_cost = i, cost
    return best

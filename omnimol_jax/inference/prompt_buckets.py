"""Prompt lengths for a whole run of batches, chosen before the first one runs, so that few programs compile.

Every distinct prompt shape is a compile of the generation program (and of the number-median decoder's two).
A run that knows its batches up front (`omnimol eval`) plans the padded lengths once:
- the longest batch sets the top length, rounded up to `multiple` (not to a power of two: a top bucket of 512
  for prompts of 279 tokens would nearly double the prefill and the decode cache of those batches);
- below it, each length is half the one above (rounded up to `multiple`) down to `min_length`, so a batch is
  padded by less than 2x, as with powers of two;
- a length that fewer than `min_batches` batches would use is dropped and its batches take the next longer one:
  a compile costs more than padding a few batches. Large evaluations keep every length; small ones (the demo,
  `--limit`) end up with one or two.
"""
from __future__ import annotations

import bisect
import dataclasses
from typing import Hashable, Sequence

from omnimol_jax.data.graphs import round_up


@dataclasses.dataclass(frozen=True)
class PromptBuckets:
    """The planned padded prompt lengths, shortest first."""

    lengths: tuple[int, ...]

    @classmethod
    def plan(cls, batch_lengths: Sequence[int], *, min_length: int = 32, multiple: int = 64,
             min_batches: int = 4) -> "PromptBuckets":
        """Lengths for batches whose longest prompts are `batch_lengths` (one entry per batch)."""
        if not batch_lengths:
            raise ValueError("no batches to plan prompt lengths for")
        if min(batch_lengths) < 1 or min_length < 1 or multiple < 1 or min_batches < 1:
            raise ValueError(f"lengths, min_length, multiple and min_batches must be >= 1; got "
                             f"{min(batch_lengths)}, {min_length}, {multiple}, {min_batches}")
        top = max(round_up(max(batch_lengths), multiple), int(min_length))
        candidates = [top]
        while True:
            half = max(round_up(-(-candidates[-1] // 2), multiple), int(min_length))
            if half >= candidates[-1]:
                break
            candidates.append(half)
        candidates.sort()
        uses = [0] * len(candidates)
        for length in batch_lengths:
            uses[bisect.bisect_left(candidates, length)] += 1
        kept, carried = [], 0
        for length, count in zip(candidates, uses):  # shortest first: a sparse length hands its batches up
            carried += count
            if carried >= min_batches or length == top:
                if carried:
                    kept.append(length)
                carried = 0
        return cls(tuple(kept))

    def bucket_for(self, length: int) -> int:
        """The padded length of a batch whose longest prompt has `length` tokens."""
        index = bisect.bisect_left(self.lengths, length)
        if index == len(self.lengths):
            raise ValueError(f"a prompt of {length} tokens is longer than every planned length {self.lengths}")
        return self.lengths[index]


def plan_batch_lengths(batch_lengths: Sequence[int], groups: Sequence[Hashable], **plan_options) -> list[int]:
    """The padded length of each batch, planned apart for each group of batches that share programs (e.g. one
    decoder: another decoder compiles its own programs anyway, so its batches do not keep a length alive)."""
    if len(batch_lengths) != len(groups):
        raise ValueError(f"{len(batch_lengths)} batch lengths but {len(groups)} groups")
    plans = {group: PromptBuckets.plan([n for n, g in zip(batch_lengths, groups) if g == group], **plan_options)
             for group in set(groups)}
    return [plans[group].bucket_for(n) for n, group in zip(batch_lengths, groups)]

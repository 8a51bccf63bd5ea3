"""The step's loops (scanned layers, loss chunks, gradient accumulation), and a switch that unrolls them for cost
accounting.

XLA's cost analysis counts a while loop's body once, whatever its trip count, so the FLOPs and bytes of a step
with scanned layers, a chunked loss or accumulated micro-batches would be under-reported (MFU, `omnimol compile`'s
roofline). Inside `unrolled_for_costing()`, every loop made here is traced fully unrolled: such a lowering is only
analysed for its costs, never compiled.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterator

import jax

_UNROLLED = contextvars.ContextVar("omnimol_unrolled_for_costing", default=False)


@contextlib.contextmanager
def unrolled_for_costing() -> Iterator[None]:
    token = _UNROLLED.set(True)
    try:
        yield
    finally:
        _UNROLLED.reset(token)


def scan(body: Callable, carry: Any, xs: Any) -> tuple[Any, Any]:
    """`jax.lax.scan(body, carry, xs)`: one loop, or fully unrolled inside `unrolled_for_costing()`. A scan of one
    iteration (one micro-batch, one loss chunk) is unrolled too: no while loop for XLA to keep, and the step's costs
    need no second lowering."""
    length = jax.tree.leaves(xs)[0].shape[0] if jax.tree.leaves(xs) else 0
    return jax.lax.scan(body, carry, xs, unroll=True if _UNROLLED.get() or length == 1 else 1)


def map_chunks(fn: Callable, xs: Any) -> Any:
    """`jax.lax.map(fn, xs)` through `scan`."""
    return scan(lambda carry, x: (carry, fn(x)), None, xs)[1]

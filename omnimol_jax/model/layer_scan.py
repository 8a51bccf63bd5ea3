"""Scanned decoder layers: one compiled layer body per repeating group, so compile time does not grow with depth.

The layers stay stored one module per layer (`layers[i]`), so checkpoints, HF/release conversion and LoRA merging
see the same parameters with the scan on or off. Inside the traced forward, each repeating group's variables are
stacked along a leading `layers` axis and `jax.lax.scan` runs one body over them (with remat inside the body, as
MaxText's `scan_layers`). The stack is one copy of the group's weights per step; its transpose in the backward
pass slices the gradients back per layer.

A group is `repeats` copies of a block of `block` consecutive layers with the same structure: the paper's
`last_quarter` MoGE layers give a dense group and a MoGE group (block 1 each); `every_4th` gives one group with a
block of four (three dense, one MoGE). Layers outside any repetition run unrolled.
"""
from __future__ import annotations

from typing import Callable, Hashable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from omnimol_jax import loops
from omnimol_jax.model.lora import fold_rng
from omnimol_jax.sharding import constrain


class Segment(NamedTuple):
    start: int    # first layer
    block: int    # layers per scan step
    repeats: int  # scan length (1: run unrolled)

    @property
    def stop(self) -> int:
        return self.start + self.block * self.repeats


def scan_plan(kinds: Sequence[Hashable]) -> tuple[Segment, ...]:
    """Covers layers 0..n-1 (of the given structural kinds) with segments, greedily from the front: at each layer
    the block length whose repetition covers the most layers (the shorter block on a tie)."""
    segments, i, n = [], 0, len(kinds)
    while i < n:
        best = Segment(i, 1, 1)
        for block in range(1, (n - i) // 2 + 1):
            pattern = list(kinds[i:i + block])
            repeats = 1
            while list(kinds[i + repeats * block:i + (repeats + 1) * block]) == pattern:
                repeats += 1
            if repeats >= 2 and block * repeats > best.block * best.repeats:
                best = Segment(i, block, repeats)
        segments.append(best)
        i = best.stop
    return tuple(segments)


def _stack_states(states: list) -> nnx.State:
    """One state whose every leaf has a leading `layers` axis, sharded as the per-layer variable is."""
    def stack(*variables):
        stacked = jnp.stack([v.get_value() for v in variables])
        axes = variables[0].get_metadata().get("logical_axes")
        if axes is not None:
            stacked = constrain(stacked, ("layers",) + tuple(axes))
        return variables[0].replace(stacked)

    return jax.tree.map(stack, *states, is_leaf=lambda v: isinstance(v, nnx.Variable))


def run_segment(layers: Sequence[nnx.Module], segment: Segment, x: jax.Array, inputs, dropout_rng: Optional[jax.Array],
                checkpoint: Callable[[Callable], Callable]) -> tuple[jax.Array, list[dict]]:
    """Runs layers segment.start .. segment.stop - 1 (without a KV cache) as one `lax.scan`.

    Returns the activations and the MoGE layers' aux dicts, each leaf with a leading axis over those layers in
    layer order. `checkpoint` wraps one layer's pure call (remat) or returns it unchanged.
    """
    block, repeats = segment.block, segment.repeats
    graphdefs, stacked = [], []
    for j in range(block):
        members = [layers[segment.start + r * block + j] for r in range(repeats)]
        splits = [nnx.split(layer) for layer in members]
        graphdef = splits[0][0]
        if any(g != graphdef for g, _ in splits[1:]):
            raise ValueError(f"layers {[segment.start + r * block + j for r in range(repeats)]} differ in structure "
                             f"and cannot be scanned together")
        graphdefs.append(graphdef)
        stacked.append(_stack_states([s for _, s in splits]))

    def layer_call(graphdef):
        def pure(state, x, rng):
            x, _, aux = nnx.merge(graphdef, state)(x, inputs, None, rng)
            return x, aux
        return checkpoint(pure)

    calls = [layer_call(g) for g in graphdefs]
    first_layers = segment.start + jnp.arange(repeats, dtype=jnp.int32) * block

    def body(x, scanned):
        states, first = scanned
        auxes = []
        for j in range(block):
            x, aux = calls[j](states[j], x, fold_rng(dropout_rng, first + j))
            auxes.append(aux)
        return x, tuple(auxes)

    x, auxes = loops.scan(body, x, (tuple(stacked), first_layers))
    moe_auxes = [aux for aux in auxes if aux is not None]  # each leaf [repeats, ...], one per MoGE layer of a block
    if not moe_auxes:
        return x, []
    # layer order within the group is (repeat, position in block): interleave the block's MoGE layers per repeat
    merged = {key: jnp.stack([aux[key] for aux in moe_auxes], axis=1).reshape((-1,) + moe_auxes[0][key].shape[1:])
              for key in moe_auxes[0]}
    return x, [merged]

"""Projector from graph-tower node vectors (300) into the LLM embedding space (d_model).

`linear`: Linear(300 -> d) with bias (Omni-Mol's default). `mlp2x_silu`: Linear(300 -> d), SiLU,
Linear(d -> d). Runs in fp32 (as the reference casts the projector to float); the caller casts the
output to the LLM's dtype.
"""
from __future__ import annotations

from typing import Literal

import jax
from flax import nnx

from omnimol_jax.model.gin import Dense

ProjectorType = Literal["linear", "mlp2x_silu"]
PROJECTOR_TYPES: tuple[str, ...] = ("linear", "mlp2x_silu")


class Projector(nnx.Module):
    def __init__(self, in_features: int, out_features: int, projector_type: ProjectorType = "linear", *,
                 rngs: nnx.Rngs):
        if projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"unknown projector_type {projector_type!r}; expected one of {PROJECTOR_TYPES}")
        self.projector_type = projector_type
        self.linear_in = Dense(in_features, out_features, ("projector_in", "embed"), rngs=rngs)
        if projector_type == "mlp2x_silu":
            # The hidden width is d_model too; its input dim is left unsharded (None), the output follows embed.
            self.linear_out = Dense(out_features, out_features, (None, "embed"), rngs=rngs)

    def __call__(self, node_embeddings: jax.Array) -> jax.Array:
        x = self.linear_in(node_embeddings)
        if self.projector_type == "mlp2x_silu":
            x = self.linear_out(jax.nn.silu(x))
        return x

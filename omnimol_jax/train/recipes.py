"""Stage recipes: which parameters a training stage updates (everything else is frozen, passed in, never updated).

Freezing lives only here, in a parameter filter: the model never stops a gradient, and jax differentiates only
the trainable parameters, so a frozen part costs no backward pass.
"""
from __future__ import annotations

import re
from typing import Sequence

from flax import nnx

from omnimol_jax.checkpoint import path_text
from omnimol_jax.model.lora import LoRAScale, LoRAWeight, RouterWeight


def trainable_filter(stage: int = 2, unfreeze: Sequence[str] = ()):
    """Which parameters train: stage 1 = the projector only; stage 2 = LoRA factors, GAL scalars, routers and
    the projector. Everything else (backbone, embeddings, norms, graph tower) is frozen, except parameters
    whose '/'-joined path matches one of the `unfreeze` regular expressions (e.g. `language_model` to train a
    randomly initialised backbone as well, as the from-scratch demo does)."""
    projector = nnx.PathContains("projector")
    if stage == 1:
        base = nnx.All(nnx.Param, projector)
    elif stage == 2:
        base = nnx.Any(LoRAWeight, LoRAScale, RouterWeight, nnx.All(nnx.Param, projector))
    else:
        raise ValueError(f"stage must be 1 or 2, got {stage}")
    if not unfreeze:
        return base
    patterns = [re.compile(p) for p in unfreeze]

    def unfrozen(path, value) -> bool:
        text = path_text(path)
        return any(p.search(text) for p in patterns)

    return nnx.Any(base, nnx.All(nnx.Param, unfrozen))


def split_trainable(module: nnx.Module, stage: int = 2, unfreeze: Sequence[str] = ()):
    """(graphdef, trainable params, frozen params, other state) for a functional train step."""
    return nnx.split(module, trainable_filter(stage, unfreeze), nnx.Param, ...)

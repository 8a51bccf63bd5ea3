"""Stage recipes: which parameters a training stage updates (everything else is frozen, passed in, never updated).

Freezing lives only here, in a parameter filter: the model never stops a gradient, and jax differentiates only
the trainable parameters, so a frozen part costs no backward pass.
"""
from __future__ import annotations

import re
from typing import Sequence

from flax import nnx

from omnimol_jax.checkpoint import path_text, read_metadata
from omnimol_jax.config import Config, InitConfig
from omnimol_jax.model.lora import LoRAScale, LoRAWeight, RouterWeight

GRAPH_TOWER = "graph_tower"


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


def graph_tower_pretrained(init: InitConfig) -> bool:
    """Whether the run's graph tower starts from trained weights: MoleculeSTM's, a stage-1 run's (init.projector
    brings its tower along) or a full init.checkpoint's."""
    if init.moleculestm or init.projector:
        return True
    return bool(init.checkpoint) and read_metadata(init.checkpoint)[1].get("graph") is not None


def run_unfreeze(config: Config) -> tuple[str, ...]:
    """train.unfreeze, plus the graph tower when train.graph_tower says it trains (see TrainConfig.graph_tower)."""
    patterns = tuple(config.train.unfreeze)
    mode = config.train.graph_tower
    if mode == "always" or (mode == "auto" and not graph_tower_pretrained(config.init)):
        patterns += (f"^{GRAPH_TOWER}/",)
    return patterns


def run_trainable_filter(config: Config):
    """The trainable filter of a run config: its stage, train.unfreeze and train.graph_tower."""
    return trainable_filter(config.train.stage, run_unfreeze(config))

"""Models from their configs: deterministic no-argument constructors, so that the same model can be built
abstractly (`nnx.eval_shape`), directly in its shards (`sharding.create_sharded_model`) or eagerly."""
from __future__ import annotations

from flax import nnx

from omnimol_jax.config import GraphConfig, ModelConfig


def omnimol_constructor(model_config: ModelConfig, graph_config: GraphConfig, seed: int = 0):
    """The full Omni-Mol model: graph tower, projector and language model."""
    from omnimol_jax.model.omnimol import OmniMolModel

    return lambda: OmniMolModel(model_config, graph_config, rngs=nnx.Rngs(seed))


def llama_constructor(model_config: ModelConfig, seed: int = 0):
    """A plain language model (what `omnimol import-hf` writes)."""
    from omnimol_jax.model.llama import LlamaForCausalLM

    return lambda: LlamaForCausalLM(model_config, rngs=nnx.Rngs(seed))

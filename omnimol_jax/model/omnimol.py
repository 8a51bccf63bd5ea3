"""Omni-Mol: frozen MoleculeSTM GIN -> projector -> atom vectors spliced into the Llama prompt.

forward(input_ids, graphs):
    token embeddings of input_ids (graph-slot sentinels clipped to id 0 for the lookup; they are
    overwritten) -> GIN over the padded graph batch -> projector
    -> splice into the slots -> Llama on `inputs_embeds`.
The tower is frozen by the trainer's parameter filter (`omnimol_jax.train.recipes.trainable_filter`), not here: a run
that lists it in `train.unfreeze` trains it, and a frozen tower costs no backward pass because jax only
differentiates the trainable parameters.
Positions count slots like ordinary tokens (the Llama's default cumulative count), which is what the
reference model sees. Decoding: the prefill call carries the graphs; later steps pass graphs=None and
only embed their new tokens, the cache holds the rest.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from omnimol_jax.config import GraphConfig, ModelConfig
from omnimol_jax.constants import IMAGE_TOKEN_ID
from omnimol_jax.graph_batch import GraphBatch, node_mask
from omnimol_jax.model.gin import GIN
from omnimol_jax.model.kv_cache import KVCache
from omnimol_jax.model.llama import CausalLMOutput, LlamaForCausalLM
from omnimol_jax.model.projector import Projector
from omnimol_jax.model.splice import splice_graph_embeddings


class OmniMolModel(nnx.Module):
    def __init__(self, config: ModelConfig, graph_config: GraphConfig = GraphConfig(), *, rngs: nnx.Rngs):
        self.graph_tower = GIN(graph_config, rngs=rngs)
        self.projector = Projector(graph_config.hidden_size, config.hidden_size, graph_config.projector_type,
                                   rngs=rngs)
        self.language_model = LlamaForCausalLM(config, rngs=rngs)

    def encode_graphs(self, graphs: GraphBatch) -> jax.Array:
        """Projected atom vectors [N_pad, d_model] (fp32); padding rows hold the projector bias."""
        atoms = self.graph_tower(graphs.graphs, node_mask(graphs))
        return self.projector(atoms)

    def embed_inputs(self, input_ids: jax.Array, graphs: Optional[GraphBatch] = None, *,
                     validate_graph_slots: bool = False) -> jax.Array:
        """[B, S, d_model] input embeddings with graph slots filled from `graphs`."""
        embeddings = self.language_model.embed(jnp.maximum(input_ids, 0))
        if graphs is None:
            return embeddings
        return splice_graph_embeddings(embeddings, input_ids, self.encode_graphs(graphs), graphs.node_sample_index,
                                       image_token_id=IMAGE_TOKEN_ID, validate=validate_graph_slots)

    def __call__(self, input_ids: jax.Array, graphs: Optional[GraphBatch] = None, *,
                 positions: Optional[jax.Array] = None, attention_mask: Optional[jax.Array] = None,
                 segment_ids: Optional[jax.Array] = None, cache: Optional[KVCache] = None,
                 return_hidden_states: bool = False, validate_graph_slots: bool = False,
                 dropout_rng: Optional[jax.Array] = None, fresh_cache: bool = False) -> CausalLMOutput:
        """See LlamaForCausalLM.__call__; `graphs` fills the graph-token slots of `input_ids`."""
        inputs_embeds = self.embed_inputs(input_ids, graphs, validate_graph_slots=validate_graph_slots)
        return self.language_model(inputs_embeds=inputs_embeds, positions=positions, attention_mask=attention_mask,
                                   segment_ids=segment_ids, cache=cache, return_hidden_states=return_hidden_states,
                                   dropout_rng=dropout_rng, fresh_cache=fresh_cache)


def variable_counts(model_config: ModelConfig, graph_config: GraphConfig) -> dict[str, int]:
    """Numbers of the full model's variables per part (language_model, graph_tower, projector), from shapes only:
    every variable a run holds (parameters, adapters, routers, GAL scales, batch-norm statistics), as `train`
    counts them."""
    import numpy as np

    abstract = nnx.eval_shape(lambda: OmniMolModel(model_config, graph_config, rngs=nnx.Rngs(0)))
    counts: dict[str, int] = {}
    for path, variable in nnx.to_flat_state(nnx.state(abstract, nnx.Variable)):
        counts[str(path[0])] = counts.get(str(path[0]), 0) + int(np.prod(variable.get_value().shape))
    return counts

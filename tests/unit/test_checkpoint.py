"""Model checkpoints: full Omni-Mol models (incl. batch-norm statistics) round-trip, sharded restore."""
import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from omnimol_jax.checkpoint import (
    CheckpointError,
    load_llama,
    load_omnimol,
    module_params,
    module_state,
    save_model_checkpoint,
    save_omnimol_checkpoint,
)
from omnimol_jax.config import GraphConfig, LoRAConfig, MeshConfig, MoGEConfig, model_config_from_preset
from omnimol_jax.model.build import omnimol_constructor
from omnimol_jax.sharding import build_mesh


def test_omnimol_checkpoint_round_trip_with_adapters_and_batch_stats(tmp_path):
    config = dataclasses.replace(model_config_from_preset("tiny"), lora=LoRAConfig(enabled=True, rank=4),
                                 moge=MoGEConfig(enabled=True, layers="all", num_experts=4))
    graph = GraphConfig(num_layers=2, hidden_size=32, projector_type="mlp2x_silu")
    model = omnimol_constructor(config, graph, seed=3)()
    # Non-default running statistics: they are not nnx.Param, and must survive too.
    stats = [v for p, v in nnx.to_flat_state(nnx.state(model, nnx.BatchStat))]
    assert stats
    stats[0].set_value(jax.numpy.full(stats[0].get_value().shape, 0.25, jax.numpy.float32))
    stat_path = tuple(map(str, nnx.to_flat_state(nnx.state(model, nnx.BatchStat))[0][0]))

    save_omnimol_checkpoint(tmp_path / "ckpt", config, graph, model, extra_metadata={"note": "test"})
    mesh = build_mesh(MeshConfig(data=2, fsdp=2, tensor=2, expert=1))
    restored, meta = load_omnimol(tmp_path / "ckpt", mesh=mesh)
    assert meta["note"] == "test" and meta["graph"]["projector_type"] == "mlp2x_silu"
    assert restored.language_model.config == config
    before, after = module_state(model), module_state(restored)
    assert before.keys() == after.keys()
    for key in before:
        np.testing.assert_array_equal(np.asarray(after[key]), np.asarray(before[key]), err_msg=str(key))
    np.testing.assert_array_equal(np.asarray(after[stat_path]), 0.25)
    q = restored.language_model.layers[0].self_attn.q_proj.kernel.get_value()
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
    save_model_checkpoint(tmp_path / "lm", config, module_params(restored.language_model))
    with pytest.raises(CheckpointError, match="holds a language model only"):
        load_omnimol(tmp_path / "lm")
    assert load_llama(tmp_path / "lm").config == config

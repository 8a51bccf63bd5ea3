"""Sharded == unsharded on 8 fake CPU devices, and parameters land where the logical-axis rules say."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from omnimol_jax.checkpoint import module_params
from omnimol_jax.config import MeshConfig, model_config_from_preset
from omnimol_jax.model.kv_cache import init_kv_cache, kv_cache_logical_axes
from omnimol_jax.model.llama import LlamaForCausalLM
from omnimol_jax.sharding import (
    batch_sharding,
    build_mesh,
    create_sharded_model,
    logical_to_spec,
    named_sharding,
    state_shardings,
    use_mesh,
)

CONFIG = model_config_from_preset("tiny", tie_word_embeddings=False)
SEED = 3

# Expected specs for the tiny model (hidden 64, heads 4, kv heads 2, mlp 160, vocab 512).
EXPECTED_SPECS = {
    (8, 1, 1, 1): {"q": P(None, None, None), "k": P(None, None, None), "embed": P(None, None),
                   "gate": P(None, None), "down": P(None, None), "lm_head": P(None, None), "norm": P(None)},
    (2, 2, 2, 1): {"q": P("fsdp", "tensor", None), "k": P("fsdp", "tensor", None), "embed": P("tensor", "fsdp"),
                   "gate": P("fsdp", "tensor"), "down": P("tensor", "fsdp"), "lm_head": P("fsdp", "tensor"),
                   "norm": P(None)},
    # 2 KV heads cannot split over tensor=4: the rule falls back to replication for that dimension only.
    (1, 2, 4, 1): {"q": P("fsdp", "tensor", None), "k": P("fsdp", None, None), "embed": P("tensor", "fsdp"),
                   "gate": P("fsdp", "tensor"), "down": P("tensor", "fsdp"), "lm_head": P("fsdp", "tensor"),
                   "norm": P(None)},
}


def _batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(3, CONFIG.vocab_size, (8, 40)).astype(np.int32)
    lengths = np.array([40, 33, 20, 40, 1, 39, 12, 40])
    mask = (np.arange(40)[None] < lengths[:, None]).astype(np.int32)
    return ids, mask


@pytest.fixture(scope="module")
def reference():
    # Same jitted initialiser on one device, so values can be compared bit for bit.
    single = build_mesh(MeshConfig(1, 1, 1, 1), devices=jax.devices()[:1])
    model = create_sharded_model(lambda: LlamaForCausalLM(CONFIG, rngs=nnx.Rngs(SEED)), single)
    ids, mask = _batch()
    logits = np.asarray(jax.jit(lambda m, i, a: m(i, attention_mask=a).logits)(model, ids, mask))
    return model, logits


def _layer0(model):
    layer = model.layers[0]
    return {"q": layer.self_attn.q_proj.kernel, "k": layer.self_attn.k_proj.kernel,
            "embed": model.embed_tokens.embedding, "gate": layer.mlp.gate_proj.kernel,
            "down": layer.mlp.down_proj.kernel, "lm_head": model.lm_head.kernel, "norm": layer.input_layernorm.scale}


@pytest.mark.parametrize("mesh_shape", list(EXPECTED_SPECS), ids=lambda s: "x".join(map(str, s)))
def test_sharded_forward_equals_single_device(reference, mesh_shape):
    ref_model, ref_logits = reference
    mesh = build_mesh(MeshConfig(*mesh_shape))
    model = create_sharded_model(lambda: LlamaForCausalLM(CONFIG, rngs=nnx.Rngs(SEED)), mesh)

    # Directly-sharded initialisation gives the same numbers as a plain one.
    ref_params, params = module_params(ref_model), module_params(model)
    for path in ref_params:
        np.testing.assert_array_equal(np.asarray(params[path]), np.asarray(ref_params[path]), err_msg=str(path))

    for name, variable in _layer0(model).items():
        value = variable.get_value()
        assert value.sharding.spec == EXPECTED_SPECS[mesh_shape][name], name
        expected_shard = tuple(dim // (np.prod([mesh.shape[a] for a in ([axes] if isinstance(axes, str) else axes)])
                                       if axes else 1)
                               for dim, axes in zip(value.shape, tuple(value.sharding.spec) + (None,) * value.ndim))
        assert value.addressable_shards[0].data.shape == expected_shard, name

    graphdef, state = nnx.split(model)
    ids, mask = _batch()
    data = batch_sharding(mesh)
    logits_sharding = named_sharding(mesh, ("activation_batch", "activation_length", "activation_vocab"),
                                     ref_logits.shape)
    forward = jax.jit(lambda s, i, a: nnx.merge(graphdef, s)(i, attention_mask=a).logits,
                      in_shardings=(state_shardings(state, mesh), data, data), out_shardings=logits_sharding)
    with use_mesh(mesh):
        logits = forward(state, jax.device_put(ids, data), jax.device_put(mask, data))
    assert logits.sharding.spec == logits_sharding.spec
    valid = mask.astype(bool)
    assert np.abs(np.asarray(logits)[valid] - ref_logits[valid]).max() <= 1e-5


def test_sharded_kv_cache_decode_matches_full_forward(reference):
    ref_model, ref_logits = reference
    mesh = build_mesh(MeshConfig(2, 2, 2, 1))
    model = create_sharded_model(lambda: LlamaForCausalLM(CONFIG, rngs=nnx.Rngs(SEED)), mesh)
    graphdef, state = nnx.split(model)
    ids, mask = _batch()
    ids, mask = ids[:, :12], np.ones((8, 12), np.int32)
    cache_shardings = jax.tree.map(lambda axes, x: named_sharding(mesh, axes, x.shape),
                                   kv_cache_logical_axes(CONFIG), init_kv_cache(CONFIG, 8, 16),
                                   is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(a, str) for a in x))

    def step(s, cache, i, a):
        out = nnx.merge(graphdef, s)(i, attention_mask=a, cache=cache)
        return out.logits, out.cache

    step = jax.jit(step, in_shardings=(state_shardings(state, mesh), cache_shardings, batch_sharding(mesh),
                                       batch_sharding(mesh)), out_shardings=(None, cache_shardings))
    with use_mesh(mesh):
        cache = jax.device_put(init_kv_cache(CONFIG, 8, 16), cache_shardings)
        logits, cache = step(state, cache, ids[:, :8], mask[:, :8])
        decoded = [logits]
        for t in range(8, 12):
            logits, cache = step(state, cache, ids[:, t:t + 1], mask[:, t:t + 1])
            decoded.append(logits)
    decoded = np.concatenate([np.asarray(x) for x in decoded], axis=1)
    full = np.asarray(ref_model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits)
    assert np.abs(decoded - full).max() <= 1e-5


def test_logical_rules():
    mesh = build_mesh(MeshConfig(1, 2, 4, 1))
    assert logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")
    assert logical_to_spec(("activation_batch", "activation_length")) == P(("data", "fsdp", "expert"), None)
    # size-1 mesh axes are dropped; indivisible dims replicate
    assert logical_to_spec(("activation_batch", None), (8, 3), mesh) == P("fsdp", None)
    assert logical_to_spec(("kv_heads",), (2,), mesh) == P(None)
    with pytest.raises(KeyError, match="logical axis 'nonsense' has no rule"):
        logical_to_spec(("nonsense",))


def test_mesh_building():
    assert dict(build_mesh(MeshConfig(-1, 2, 1, 1)).shape) == {"data": 4, "fsdp": 2, "tensor": 1, "expert": 1}
    with pytest.raises(ValueError, match="needs 12 devices, but 8 are available"):
        build_mesh(MeshConfig(3, 4, 1, 1))
    with pytest.raises(ValueError, match="not divisible"):
        build_mesh(MeshConfig(-1, 3, 1, 1))


def test_scanned_layers_sharded_equal_the_single_device_forward(reference):
    """Scanned layers on a (2, 2, 2, 1) mesh: the stacked weights keep their per-layer shardings and the logits are the
    unsharded, unrolled ones."""
    import dataclasses

    _, ref_logits = reference
    mesh = build_mesh(MeshConfig(2, 2, 2, 1))
    scanned = dataclasses.replace(CONFIG, scan_layers=True)
    model = create_sharded_model(lambda: LlamaForCausalLM(scanned, rngs=nnx.Rngs(SEED)), mesh)
    graphdef, state = nnx.split(model)
    ids, mask = _batch()
    data = batch_sharding(mesh)
    forward = jax.jit(lambda s, i, a: nnx.merge(graphdef, s)(i, attention_mask=a).logits,
                      in_shardings=(state_shardings(state, mesh), data, data))
    with use_mesh(mesh):
        text = forward.lower(state, ids, mask).as_text()
        logits = forward(state, jax.device_put(ids, data), jax.device_put(mask, data))
    assert "stablehlo.while" in text  # the layers did run as a scan
    valid = mask.astype(bool)
    assert np.abs(np.asarray(logits)[valid] - ref_logits[valid]).max() <= 1e-5


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1, 1), (2, 2, 2, 1), (1, 2, 4, 1)], ids=lambda s: "x".join(map(str, s)))
def test_block_sparse_attention_sharded_equals_single_device(mesh_shape):
    """attention_impl=block_sparse runs each device's rows under shard_map (sharding.per_shard): logits and every
    gradient equal the single-device run, with heads split (2x2x2) or, where KV heads cannot split, kept whole."""
    import dataclasses

    config = dataclasses.replace(CONFIG, attention_impl="block_sparse", attention_block=8)
    ids, mask = _batch()
    segments = np.where(np.arange(40)[None] < np.array([[17], [9], [40], [25], [1], [30], [5], [21]]), 1, 2)

    def loss(model, i, a, seg):
        logits = model(i, attention_mask=a, segment_ids=seg).logits
        return jnp.sum(jnp.where(a[..., None] > 0, jnp.sin(logits), 0.0)), logits

    def run(mesh):
        model = create_sharded_model(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(SEED)), mesh)
        graphdef, state = nnx.split(model)
        data = batch_sharding(mesh)
        grad = jax.jit(jax.grad(lambda s, i, a, g: loss(nnx.merge(graphdef, s), i, a, g), has_aux=True),
                       in_shardings=(state_shardings(state, mesh), data, data, data))
        with use_mesh(mesh):
            grads, logits = grad(state, *(jax.device_put(x, data) for x in (ids, mask, segments)))
        return dict(nnx.to_flat_state(grads)), np.asarray(logits)

    ref_grads, ref_logits = run(build_mesh(MeshConfig(1, 1, 1, 1), devices=jax.devices()[:1]))
    grads, logits = run(build_mesh(MeshConfig(*mesh_shape)))
    valid = mask.astype(bool)
    assert np.abs(logits[valid] - ref_logits[valid]).max() <= 1e-5
    for path, value in ref_grads.items():
        expected = np.asarray(value.get_value())
        np.testing.assert_allclose(np.asarray(grads[path].get_value()), expected,
                                   atol=1e-5 * max(1.0, float(np.abs(expected).max())), rtol=0, err_msg=str(path))

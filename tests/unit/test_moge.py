"""MoGE and LoRA: fused == naive, reductions to plain LoRA / frozen FFN, aux loss, sharding, frozen split."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from omnimol_jax.config import LoRAConfig, MeshConfig, MoGEConfig, model_config_from_preset
from omnimol_jax.model.llama import MLP, LlamaForCausalLM, Projection, count_parameters
from omnimol_jax.model.lora import LoRA, LoRAScale, LoRAWeight, RouterWeight, merge_lora, unmerge_lora
from omnimol_jax.model.moge import MoGEFeedForward
from omnimol_jax.sharding import build_mesh, create_sharded_model, state_shardings, use_mesh
from omnimol_jax.train.recipes import split_trainable
from omnimol_jax.train.step import router_assignments_by_task

BASE = model_config_from_preset("tiny")
TOL = 1e-5


def moge_config(**moge):
    lora = LoRAConfig(enabled=True, rank=8, dropout=0.0)
    return dataclasses.replace(BASE, lora=lora, moge=MoGEConfig(enabled=True, layers="all", **moge))


def make_layer(config, seed=0):
    kw = dict(dtype=jnp.float32, param_dtype=jnp.float32, init_std=0.02)
    return MoGEFeedForward(config, Projection, kw, rngs=nnx.Rngs(seed))


def randomize_adapters(module, seed=1, scale=0.05):
    """B = 0 at init makes every expert identical; give B (and the router) values so experts differ."""
    rng = np.random.default_rng(seed)
    for path, variable in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        if path[-1] in ("b", "router"):
            value = variable.get_value()
            variable.set_value(jnp.asarray(rng.normal(0, scale if path[-1] == "b" else 1.0, value.shape), value.dtype))


def hidden(n=2, s=7, seed=3):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, s, BASE.hidden_size)), jnp.float32)


def run_layer(layer, h, mask=None):
    mask = jnp.ones(h.shape[:2], bool) if mask is None else mask
    return layer(h, mask)


def loss_and_grads(layer, h):
    graphdef, trainable, frozen = nnx.split(layer, nnx.Any(LoRAWeight, LoRAScale, RouterWeight), ...)

    def loss_fn(tr):
        y, aux = nnx.merge(graphdef, tr, frozen)(h, jnp.ones(h.shape[:2], bool))
        return jnp.sum(jnp.sin(y)) + 3.0 * aux["aux_loss"]

    return jax.value_and_grad(loss_fn)(trainable)


def twin(layer, **changes):
    """The same weights in a layer built with different MoGE settings."""
    other = make_layer(dataclasses.replace(layer.config, moge=dataclasses.replace(layer.config.moge, **changes)))
    nnx.update(other, nnx.state(layer))
    return other


CASES = {
    "default_k2_shared": dict(),
    "k3_no_shared_renorm": dict(top_k=3, num_shared_experts=0, norm_topk_prob=True, routed_scaling_factor=2.5),
    "per_expert_ranks": dict(expert_ranks=(2, 4, 8, 16, 3)),
}


@pytest.mark.parametrize("implementation", ["fused", "stacked"])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_and_stacked_equal_naive_values_aux_and_gradients(case, implementation):
    layer = make_layer(moge_config(implementation=implementation, **CASES[case]))
    randomize_adapters(layer)
    naive = twin(layer, implementation="naive")
    h = hidden()
    (y_f, aux_f), (y_n, aux_n) = run_layer(layer, h), run_layer(naive, h)
    assert np.abs(np.asarray(y_f - y_n)).max() <= TOL
    assert abs(float(aux_f["aux_loss"] - aux_n["aux_loss"])) <= TOL
    (loss_f, grads_f), (loss_n, grads_n) = loss_and_grads(layer, h), loss_and_grads(naive, h)
    assert abs(float(loss_f - loss_n)) <= TOL
    flat_f, flat_n = dict(nnx.to_flat_state(grads_f)), dict(nnx.to_flat_state(grads_n))
    no_shared = CASES[case].get("num_shared_experts", 1) == 0
    assert flat_f.keys() == flat_n.keys() and len(flat_f) == 2 * 3 * 5 + 1 - 15 * no_shared
    for path in flat_f:
        np.testing.assert_allclose(np.asarray(flat_f[path].get_value()), np.asarray(flat_n[path].get_value()),
                                   atol=TOL, rtol=1e-4, err_msg=str(path))
    # the gradient really reaches every kind of trainable
    assert float(jnp.abs(flat_f[("router",)].get_value()).max()) > 0
    assert float(jnp.abs(flat_f[("expert_up_lora", "a")].get_value()).max()) > 0
    assert float(jnp.abs(flat_f[("expert_down_lora", "gal_p")].get_value()).max()) > 0


@pytest.mark.parametrize("implementation", ["fused", "stacked"])
def test_gal_clipping_at_the_box_edges(implementation):
    config = moge_config(implementation=implementation)
    layer = make_layer(config)
    randomize_adapters(layer)
    adapter = layer.expert_gate_lora
    # expert 0 inside the box, 1 and 2 outside on either side, 3 and 4 exactly on the edges
    adapter.gal_a.set_value(jnp.array([16.0, 17.0, 15.0, 16.1, 15.9]))
    adapter.gal_p.set_value(jnp.array([0.5, 0.6, 0.4, 0.51, 0.49]))
    adapter.gal_b.set_value(jnp.array([0.0, 0.2, -0.2, 0.05, -0.05]))
    expected = np.array([16.0 / 8 ** 0.5, 16.1 / 8 ** 0.51 + 0.05, 15.9 / 8 ** 0.49 - 0.05,
                         16.1 / 8 ** 0.51 + 0.05, 15.9 / 8 ** 0.49 - 0.05])
    np.testing.assert_allclose(np.asarray(adapter.scale()), expected, rtol=1e-6)
    naive = twin(layer, implementation="naive")
    h = hidden()
    _, grads_f = loss_and_grads(layer, h)
    _, grads_n = loss_and_grads(naive, h)
    for name in ("gal_a", "gal_b", "gal_p"):
        g_f = np.asarray(grads_f["expert_gate_lora"][name].get_value())
        g_n = np.asarray(grads_n["expert_gate_lora"][name].get_value())
        np.testing.assert_allclose(g_f, g_n, atol=TOL, rtol=1e-4)
        assert g_f[1] == 0.0 and g_f[2] == 0.0  # clipped from outside: no gradient


def test_gal_scale_starts_at_two_for_rank_64_and_plain_lora_uses_alpha_over_r():
    lora = LoRA((16,), (8,), ("embed",), ("mlp",), LoRAConfig(rank=64), compute_dtype=jnp.float32, rngs=nnx.Rngs(0))
    assert float(lora.scale()) == pytest.approx(2.0)
    plain = LoRA((16,), (8,), ("embed",), ("mlp",), LoRAConfig(rank=64, gal=False), compute_dtype=jnp.float32,
                 rngs=nnx.Rngs(0))
    assert float(plain.scale()) == pytest.approx(16 / 64)
    bound = 1 / 16 ** 0.5
    a = np.asarray(lora.a.get_value())
    assert a.min() >= -bound and a.max() <= bound and a.std() > bound / 3 and not np.asarray(lora.b.get_value()).any()


def test_single_expert_top1_without_shared_equals_plain_lora_ffn():
    config = moge_config(num_experts=1, top_k=1, num_shared_experts=0)
    layer = make_layer(config)
    randomize_adapters(layer)
    mlp = MLP(config, rngs=nnx.Rngs(5))
    for name in ("gate_proj", "up_proj", "down_proj"):
        getattr(mlp, name).kernel.set_value(getattr(layer, name).kernel.get_value())
        expert = getattr(layer, f"expert_{name.split('_')[0]}_lora")
        adapter = getattr(mlp, f"{name}_lora")
        for field in ("a", "b", "gal_a", "gal_b", "gal_p"):
            getattr(adapter, field).set_value(getattr(expert, field).get_value()[0])
    h = hidden()
    y, aux = run_layer(layer, h)
    assert np.abs(np.asarray(y - mlp(h))).max() <= TOL
    assert float(aux["aux_loss"]) == pytest.approx(1.0)  # one expert is always perfectly balanced


@pytest.mark.parametrize("shared", [0, 1])
def test_zero_b_makes_every_expert_the_frozen_ffn(shared):
    layer = make_layer(moge_config(num_shared_experts=shared))
    randomize_adapters(layer, scale=0.0)  # router random, every B zero
    h = hidden()
    y, _ = run_layer(layer, h)
    x = h.reshape(-1, h.shape[-1])
    ffn = layer.down_proj(jax.nn.silu(layer.gate_proj(x)) * layer.up_proj(x))
    _, weights, _ = layer.route(x)
    expected = (weights.sum(-1, keepdims=True) + shared) * ffn
    assert np.abs(np.asarray(y.reshape(-1, y.shape[-1]) - expected)).max() <= TOL
    assert float(weights.sum(-1).min()) < 0.99  # not renormalised: the (1 + w1 + w2) quirk is visible


def test_aux_loss_balanced_and_hand_computed():
    layer = make_layer(moge_config(num_experts=4, top_k=2))
    probs = jnp.asarray(np.random.default_rng(0).dirichlet(np.ones(4), size=4), jnp.float32)
    balanced = jnp.array([[0, 1], [2, 3], [1, 0], [3, 2]])  # every expert chosen twice of 8
    assert float(layer.aux_loss(probs, balanced, jnp.ones(4))) == pytest.approx(1.0, abs=1e-6)

    two = make_layer(moge_config(num_experts=2, top_k=1, aux_loss_alpha=2.0))
    probs = jnp.array([[0.9, 0.1], [0.6, 0.4]])
    # f = 2/(2*1) * [2, 0] = [2, 0]; P = [0.75, 0.25]; alpha * sum f P = 2 * 1.5
    assert float(two.aux_loss(probs, jnp.array([[0], [0]]), jnp.ones(2))) == pytest.approx(3.0, abs=1e-6)
    # ignoring the second (padding) token: f = 2/(1*1) * [1, 0], P = [0.9, 0.1] -> 2 * 1.8
    assert float(two.aux_loss(probs, jnp.array([[0], [0]]), jnp.array([1.0, 0.0]))) == pytest.approx(3.6, abs=1e-6)


def test_router_statistics_per_task():
    config = dataclasses.replace(moge_config(num_experts=2, top_k=1, num_shared_experts=0),
                                 hidden_size=BASE.hidden_size)
    model = LlamaForCausalLM(dataclasses.replace(config, num_layers=1), rngs=nnx.Rngs(0))
    layer = model.layers[0].mlp
    # the router picks expert 0 for every token of any input with a positive first feature, else expert 1
    router = np.zeros((2, BASE.hidden_size), np.float32)
    router[0, 0], router[1, 0] = 50.0, -50.0
    layer.router.set_value(jnp.asarray(router))
    h = np.zeros((3, 4, BASE.hidden_size), np.float32)
    h[0, :, 0], h[1, :, 0], h[2, :2, 0], h[2, 2:, 0] = 1.0, -1.0, 1.0, -1.0
    mask = jnp.asarray([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]], bool)
    _, aux = layer(jnp.asarray(h), mask)
    token_tasks = jnp.asarray(np.repeat([[0], [1], [2]], 4, 1))
    by_task = router_assignments_by_task(aux["router_assignments"][None], token_tasks, num_tasks=4)[0]
    # task 0: 4 tokens on expert 0; task 1: 3 real tokens on expert 1 (the pad carries none); task 2: 2 and 2
    np.testing.assert_allclose(np.asarray(by_task), [[4, 0], [0, 3], [2, 2], [0, 0]], atol=1e-6)
    np.testing.assert_allclose(np.asarray(aux["router_load"]), [6 / 11, 5 / 11], atol=1e-6)


@pytest.mark.parametrize("implementation", ["fused", "stacked"])
def test_whole_model_fused_and_stacked_equal_naive_with_dropout_and_task_stats(implementation):
    config = dataclasses.replace(moge_config(), num_layers=4,
                                 lora=LoRAConfig(enabled=True, rank=8, dropout=0.1),
                                 moge=MoGEConfig(enabled=True, layers="second_half", implementation=implementation))
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    randomize_adapters(model)
    naive_cfg = dataclasses.replace(config, moge=dataclasses.replace(config.moge, implementation="naive"))
    naive = LlamaForCausalLM(naive_cfg, rngs=nnx.Rngs(9))
    nnx.update(naive, nnx.state(model))
    ids = jnp.asarray(np.random.default_rng(0).integers(3, BASE.vocab_size, (2, 9)))
    key = jax.random.key(42)
    out_f = model(ids, dropout_rng=key)
    out_n = naive(ids, dropout_rng=key)
    assert out_f.aux["aux_loss"].shape == (2,) and out_f.aux["router_assignments"].shape == (2, 2 * 9, 5)
    np.testing.assert_array_equal(np.asarray(out_f.aux["router_assignments"]),
                                  np.asarray(out_n.aux["router_assignments"]))
    assert np.abs(np.asarray(out_f.logits - out_n.logits)).max() <= TOL
    # dropout is on: a different key changes the output, no key is deterministic
    assert np.abs(np.asarray(model(ids, dropout_rng=jax.random.key(1)).logits - out_f.logits)).max() > 1e-4
    np.testing.assert_array_equal(np.asarray(model(ids).logits), np.asarray(model(ids).logits))


def test_merge_and_unmerge_plain_lora():
    config = dataclasses.replace(BASE, lora=LoRAConfig(enabled=True, rank=4, dropout=0.0))
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    randomize_adapters(model, scale=0.1)
    ids = jnp.asarray(np.random.default_rng(0).integers(3, BASE.vocab_size, (2, 9)))
    before = np.asarray(model(ids).logits)
    kernel = np.asarray(model.layers[0].self_attn.o_proj.kernel.get_value())
    assert merge_lora(model) == 2 * 7
    merged_kernel = np.asarray(model.layers[0].self_attn.o_proj.kernel.get_value())
    assert np.abs(merged_kernel - kernel).max() > 1e-4
    assert np.abs(np.asarray(model(ids).logits) - before).max() <= TOL
    assert unmerge_lora(model) == 14 and merge_lora(model) == 14 and unmerge_lora(model) == 14
    np.testing.assert_allclose(np.asarray(model.layers[0].self_attn.o_proj.kernel.get_value()), kernel, atol=1e-6)
    assert np.abs(np.asarray(model(ids).logits) - before).max() <= TOL


def _train_config(**moge):
    return dataclasses.replace(BASE, num_layers=2, lora=LoRAConfig(enabled=True, rank=4, dropout=0.0),
                               moge=MoGEConfig(enabled=True, layers="second_half", num_experts=4, **moge))


def _loss_fn(graphdef, frozen, ids):
    def loss(trainable):
        out = nnx.merge(graphdef, trainable, frozen)(ids[:, :-1])
        ce = optax.softmax_cross_entropy_with_integer_labels(out.logits, ids[:, 1:]).mean()
        return ce + 0.01 * out.aux["aux_loss"].sum()
    return loss


@pytest.mark.parametrize("mesh_shape", [pytest.param((8, 1, 1, 1), id="expert1", marks=pytest.mark.slow),
                                        pytest.param((2, 2, 1, 2), id="expert2"),
                                        pytest.param((2, 1, 1, 4), id="expert4")])
def test_sharded_over_expert_axis_matches_single_device(mesh_shape):
    config = _train_config()
    ids = jnp.asarray(np.random.default_rng(0).integers(3, BASE.vocab_size, (8, 12)))

    def build():
        model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
        randomize_adapters(model)
        return model

    reference = build()
    graphdef, trainable, frozen = split_trainable(reference)[:3]
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(_loss_fn(graphdef, frozen, ids)))(trainable)

    mesh = build_mesh(MeshConfig(*mesh_shape))
    sharded = create_sharded_model(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0)), mesh)
    nnx.update(sharded, jax.device_put(nnx.state(reference), state_shardings(nnx.state(sharded), mesh)))
    graphdef, trainable, frozen = split_trainable(sharded)[:3]
    expert_a = sharded.layers[1].mlp.expert_gate_lora.a.get_value()
    assert expert_a.sharding.spec[0] == ("expert" if mesh_shape[3] > 1 else None)
    with use_mesh(mesh):
        loss, grads = jax.jit(jax.value_and_grad(_loss_fn(graphdef, frozen, ids)))(trainable)
    assert abs(float(loss) - float(ref_loss)) <= TOL
    for (path, g), (_, r) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(ref_grads)):
        np.testing.assert_allclose(np.asarray(g.get_value()), np.asarray(r.get_value()), atol=TOL, err_msg=str(path))


def test_frozen_parameters_get_no_gradient_and_no_optimizer_state():
    model = LlamaForCausalLM(_train_config(), rngs=nnx.Rngs(0))
    graphdef, trainable, frozen, rest = split_trainable(model)
    assert not jax.tree.leaves(rest)
    frozen_paths = {p for p, _ in nnx.to_flat_state(frozen)}
    assert ("embed_tokens", "embedding") in frozen_paths
    assert ("layers", 1, "mlp", "gate_proj", "kernel") in frozen_paths
    assert all(p[-1] in ("a", "b", "gal_a", "gal_b", "gal_p", "router") for p, _ in nnx.to_flat_state(trainable))
    ids = jnp.asarray(np.random.default_rng(0).integers(3, BASE.vocab_size, (2, 10)))
    tx = optax.adamw(1e-2)
    opt_state = tx.init(trainable)
    n_opt = sum(x.size for x in jax.tree.leaves(opt_state))
    n_trainable = sum(x.size for x in jax.tree.leaves(trainable))
    assert n_opt == 2 * n_trainable + 1  # mu, nu and the step count; nothing for frozen weights
    frozen_before = jax.tree.map(np.asarray, frozen)
    grads = jax.jit(jax.grad(_loss_fn(graphdef, frozen, ids)))(trainable)  # differentiates trainables only
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(frozen_before)):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_llama3_2_1b_moge_parameter_count():
    config = dataclasses.replace(model_config_from_preset("llama3_2_1b"), lora=LoRAConfig(enabled=True),
                                 moge=MoGEConfig(enabled=True))
    d, f, r, layers, moe_layers = 2048, 8192, 64, 16, 4
    attention = r * (d + 32 * 64) + r * (d + 8 * 64) * 2 + r * (32 * 64 + d)  # q, k, v, o
    ffn = r * (d + f) * 3
    adapter_scalars = 3
    expected = (1_235_814_400
                + layers * (attention + 4 * adapter_scalars)
                + (layers - moe_layers) * (ffn + 3 * adapter_scalars)
                + moe_layers * (6 * (ffn + 3 * adapter_scalars) + 5 * d))  # 5 routed + 1 shared expert, router
    assert count_parameters(config) == expected
    assert 1.3e9 < expected < 1.4e9  # vs ~2.2B in the reference, which deep-copies the frozen FFN per expert

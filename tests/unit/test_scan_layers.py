"""Scanned decoder layers (`model.scan_layers`) compute what the unrolled layers compute: the same logits, aux
statistics, losses and gradients within 1e-5 on the paper's stage-2 recipe (frozen backbone, LoRA + MoGE with
dropout on), with and without remat; the same parameters, so a checkpoint saved either way loads the other way; and
the scan plan groups layers as hand-worked here."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from omnimol_jax.config import GraphConfig, model_config_from_preset
from omnimol_jax.constants import IGNORE_INDEX, IMAGE_TOKEN_ID
from omnimol_jax.data.featurize import selfies_to_graph
from omnimol_jax.data.graphs import batch_graphs, prompt_graph_budget
from omnimol_jax.model.build import omnimol_constructor
from omnimol_jax.model.layer_scan import Segment, scan_plan
from omnimol_jax.model.llama import LlamaForCausalLM
from omnimol_jax.train.flops import compiled_flops, step_costs
from omnimol_jax.train.recipes import trainable_filter
from omnimol_jax.train.step import StateLayout, flatten_state, token_losses

GRAPH = GraphConfig(num_layers=2, hidden_size=16)
MOLECULES = ("[C][C][O]", "[C][C][=C][C][=C][C][=C][Ring1][=Branch1]")


def kinds(num_layers, moe):
    return [i in set(moe) for i in range(num_layers)]


@pytest.mark.parametrize("layer_kinds, expected", [
    (kinds(16, range(16)), [Segment(0, 1, 16)]),                                 # all MoGE
    (kinds(16, range(12, 16)), [Segment(0, 1, 12), Segment(12, 1, 4)]),           # last_quarter (the paper)
    (kinds(16, range(3, 16, 4)), [Segment(0, 4, 4)]),                            # every_4th: DDDM x 4
    (kinds(10, range(3, 10, 4)), [Segment(0, 4, 2), Segment(8, 1, 2)]),          # DDDM DDDM DD
    (kinds(7, (2, 5)), [Segment(0, 3, 2), Segment(6, 1, 1)]),                    # DDM DDM D
    (kinds(3, (1,)), [Segment(0, 1, 1), Segment(1, 1, 1), Segment(2, 1, 1)]),  # nothing repeats
])
def test_scan_plan(layer_kinds, expected):
    assert list(scan_plan(layer_kinds)) == expected


def config(moe_layers, **overrides):
    return model_config_from_preset(
        "tiny", num_layers=6, lora={"enabled": True, "rank": 4, "dropout": 0.1},
        moge={"enabled": True, "layer_list": list(moe_layers), "num_experts": 3, "top_k": 2}, **overrides)


def graph_batch(seed: int, vocab: int, seq: int = 24) -> dict:
    """Two rows, each a molecule's graph slots then text, packed as two segments; labels on the second half."""
    rng = np.random.default_rng(seed)
    graphs = [selfies_to_graph(m, GRAPH.feature_mode) for m in MOLECULES]
    ids = np.stack([np.concatenate([np.full(g.num_nodes, IMAGE_TOKEN_ID),
                                    rng.integers(3, vocab, seq - g.num_nodes)]) for g in graphs]).astype(np.int32)
    labels = np.where(np.arange(seq)[None] >= seq // 2, ids, IGNORE_INDEX).astype(np.int32)
    segments = np.where(np.arange(seq) < seq - 5, 1, 2).astype(np.int32)[None].repeat(2, 0)
    positions = np.where(segments == 1, np.arange(seq), np.arange(seq) - (seq - 5)).astype(np.int32)
    batch, _ = batch_graphs(graphs, prompt_graph_budget(graphs, rows=len(graphs)))
    return {"input_ids": ids, "labels": labels, "positions": positions, "segment_ids": segments,
            "attention_mask": np.ones_like(ids), "token_task_ids": np.zeros_like(ids), "graphs": batch}


def losses_and_gradients(model_config):
    model = omnimol_constructor(model_config, GRAPH, seed=0)()
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(2, ()), ...)
    rng = np.random.default_rng(1)  # B away from zero, so the adapters shape the loss
    params = {k: (jnp.asarray(rng.normal(0, 0.1, v.shape), v.dtype) if k.endswith("/b") else v)
              for k, v in flatten_state(trainable).items()}
    layout = StateLayout.of(trainable)

    def loss(trainable, frozen, batch, key):
        ce, mask, _, aux = token_losses(nnx.merge(graphdef, layout.unflatten(trainable), frozen), batch, key)
        return ce.sum() / mask.sum() + 0.01 * aux["aux_loss"].sum(), aux

    value_and_grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
    results = []
    for i in range(2):
        (value, aux), grads = value_and_grad(params, frozen, graph_batch(i, model_config.vocab_size),
                                             jax.random.key(i))
        results.append((float(value), jax.tree.map(np.asarray, aux), {k: np.asarray(g) for k, g in grads.items()}))
    return results


@pytest.mark.parametrize("moe_layers, remat", [
    ((4, 5), "none"),                                  # a dense group and a MoGE group
    pytest.param((2, 5), "dots_with_no_batch_dims", marks=pytest.mark.slow),  # blocks DDM, remat inside the scan
])
def test_scanned_layers_give_the_unrolled_losses_aux_and_gradients(moe_layers, remat):
    unrolled = losses_and_gradients(config(moe_layers, remat_policy=remat))
    scanned = losses_and_gradients(config(moe_layers, remat_policy=remat, scan_layers=True))
    for (loss, aux, grads), (loss_ref, aux_ref, grads_ref) in zip(scanned, unrolled):
        assert np.isfinite(loss) and loss == pytest.approx(loss_ref, rel=1e-5, abs=1e-5)
        assert aux.keys() == aux_ref.keys() and aux["aux_loss"].shape == (2,)
        for key in aux:
            np.testing.assert_allclose(aux[key], aux_ref[key], atol=1e-5, rtol=1e-5, err_msg=key)
        assert grads.keys() == grads_ref.keys()
        assert any(k.startswith("language_model/layers/5/mlp/expert_gate_lora") for k in grads)
        assert all(np.abs(grads[k]).max() > 0 for k in grads if k.endswith("/b"))
        for key, value in grads.items():
            np.testing.assert_allclose(value, grads_ref[key], atol=1e-5, rtol=1e-5, err_msg=key)


def test_scanned_and_unrolled_models_hold_the_same_parameters_and_logits():
    """One state serves both paths (checkpoints are interchangeable), and greedy decoding (unrolled, with the KV
    cache) follows the scanned forward's logits."""
    unrolled_config, scanned_config = config((4, 5)), config((4, 5), scan_layers=True)
    unrolled = LlamaForCausalLM(unrolled_config, rngs=nnx.Rngs(0))
    scanned = LlamaForCausalLM(scanned_config, rngs=nnx.Rngs(0))
    state, scanned_state = nnx.state(unrolled), nnx.state(scanned)
    assert jax.tree.structure(state) == jax.tree.structure(scanned_state)
    nnx.update(scanned, jax.tree.map(lambda a: a + 0.01, state))  # not the init: a loaded checkpoint
    nnx.update(unrolled, nnx.state(scanned))
    ids = jnp.asarray(np.random.default_rng(0).integers(3, unrolled_config.vocab_size, (2, 40)), jnp.int32)
    expected = unrolled(ids)
    got = scanned(ids)
    np.testing.assert_allclose(got.logits, expected.logits, atol=1e-5, rtol=1e-5)
    for key in expected.aux:
        np.testing.assert_allclose(got.aux[key], expected.aux[key], atol=1e-6, err_msg=key)


def test_the_decoder_layers_compile_once_per_group():
    """The scanned forward's HLO holds one copy of the layer body: its matmuls do not grow in number with depth (the
    unrolled forward has one copy per layer)."""
    def matmuls(num_layers, scan):
        model_config = model_config_from_preset("tiny", num_layers=num_layers, scan_layers=scan,
                                                lora={"enabled": True, "rank": 4})
        graphdef, state = nnx.split(LlamaForCausalLM(model_config, rngs=nnx.Rngs(0)))
        ids = jnp.zeros((1, 16), jnp.int32)
        forward = jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids).logits)
        return forward.lower(state, ids).as_text().count("dot_general")

    assert matmuls(8, scan=True) == matmuls(2, scan=True)
    assert matmuls(8, scan=False) - matmuls(2, scan=False) == 3 * (matmuls(4, scan=False) - matmuls(2, scan=False))


def test_step_costs_count_every_layer_and_loss_chunk():
    """XLA counts a loop body once; `step_costs` counts the scanned layers and the chunked loss in full: the same
    FLOPs (within 5%: the counted figure scales XLA's optimized count by a ratio of unoptimized lowerings, and the
    fused head + CE's elementwise backward is fused differently per chunk) as the unrolled, unchunked forward +
    backward, where XLA's own figure for the looped program is far lower."""
    def costs(scan, chunk):
        model_config = model_config_from_preset("tiny", num_layers=6, scan_layers=scan,
                                                lora={"enabled": True, "rank": 4})
        graphdef, state = nnx.split(LlamaForCausalLM(model_config, rngs=nnx.Rngs(0)))
        ids = jnp.zeros((2, 64), jnp.int32)

        def loss(state, ids):
            model = nnx.merge(graphdef, state)
            hidden = model(ids, return_hidden_states=True).hidden_states
            return model.chunked_cross_entropy(hidden, ids, chunk).sum() if chunk else hidden.sum()

        step = jax.jit(jax.grad(loss))
        lowered = step.lower(state, ids)
        compiled = lowered.compile()
        return compiled_flops(compiled), step_costs(compiled, lowered, step.__wrapped__, state, ids)[0]

    plain, plain_counted = costs(False, 64)
    looped, looped_counted = costs(True, 16)
    assert plain_counted == plain  # no loop: XLA's figure as it is
    assert looped < 0.6 * plain
    assert looped_counted == pytest.approx(plain, rel=0.05)

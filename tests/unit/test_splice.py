"""Graph-token splice: host-side slot expansion, the jitted splice, gradients, shardings, the wrapper."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from omnimol_jax import graph_batch
from omnimol_jax.config import GraphConfig, MeshConfig, ModelConfig
from omnimol_jax.constants import IGNORE_INDEX, IMAGE_TOKEN_ID
from omnimol_jax.data import graph_slots as GS, graphs as G
from omnimol_jax.data.featurize import smiles_to_graph
from omnimol_jax.model import splice as S
from omnimol_jax.model.gin import GIN
from omnimol_jax.model.projector import Projector
from omnimol_jax.sharding import build_mesh

IMG = IMAGE_TOKEN_ID
PAD = 0
POISON = 1.0e6  # value of padding-node embeddings: must never show up in a spliced sequence


def test_expand_image_placeholder_ids_and_labels():
    ids, labels = GS.expand_image_placeholder([1, 2, IMG, 3, 4], 3, labels=[-100, -100, -100, 3, 4])
    assert ids.tolist() == [1, 2, IMG, IMG, IMG, 3, 4]
    assert labels.tolist() == [-100, -100, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 3, 4]
    assert ids.dtype == np.int32
    text_ids, text_labels = GS.expand_image_placeholder([1, 2, 3], None, labels=[1, 2, 3])
    assert text_ids.tolist() == [1, 2, 3] and text_labels.tolist() == [1, 2, 3]
    GS.check_graph_slots(ids, 3)
    GS.check_graph_slots(text_ids, 0)


@pytest.mark.parametrize("ids, atoms, message", [
    ([1, IMG, 2, IMG], 4, "found 2"),
    ([1, 2], 4, "found 0"),
    ([1, IMG], None, "text-only sample has 1"),
])
def test_expand_image_placeholder_errors_name_the_record(ids, atoms, message):
    with pytest.raises(GS.GraphSlotError, match=message) as info:
        GS.expand_image_placeholder(ids, atoms, record_id="rec-7")
    assert "rec-7" in str(info.value)


def test_check_graph_slots_counts():
    with pytest.raises(GS.GraphSlotError, match="record 'x': 2 graph slots for a graph of 3 atoms"):
        GS.check_graph_slots([IMG, IMG, 5], 3, record_id="x")


def build_batch(seq_len=12):
    """Three rows: a 3-atom graph (right-padded), text only, a 5-atom graph (left-padded)."""
    ethanol, acetate = smiles_to_graph("CCO"), smiles_to_graph("CC(=O)[O-].[Na+]")
    row0, _ = GS.expand_image_placeholder([11, 12, IMG, 13, 14], ethanol.num_nodes)
    row1, _ = GS.expand_image_placeholder([21, 22, 23, 24, 25, 26], None)
    row2, _ = GS.expand_image_placeholder([31, IMG, 32], acetate.num_nodes)
    ids = np.full((3, seq_len), PAD, np.int32)
    ids[0, :len(row0)] = row0
    ids[1, :len(row1)] = row1
    ids[2, seq_len - len(row2):] = row2
    batch, _ = G.batch_graphs([ethanol, None, acetate], G.GraphBudget(max_nodes=16, max_edges=32, max_graphs=4))
    return ids, batch


def hand_spliced(token_embeddings, ids, node_embeddings, node_rows):
    expected = np.array(token_embeddings, copy=True)
    for row in range(ids.shape[0]):
        atoms = [n for n in range(len(node_rows)) if node_rows[n] == row]
        slots = [s for s in range(ids.shape[1]) if ids[row, s] == IMG]
        assert len(atoms) == len(slots)
        for slot, atom in zip(slots, atoms):
            expected[row, slot] = node_embeddings[atom]
    return expected


def test_splice_matches_hand_built_sequence_and_never_reads_padding():
    ids, batch = build_batch()
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(3, 12, 6)).astype(np.float32)
    nodes = rng.normal(size=(16, 6)).astype(np.float32)
    nodes[batch.node_sample_index < 0] = POISON
    spliced = jax.jit(S.splice_graph_embeddings)(tokens, ids, nodes, batch.node_sample_index)
    expected = hand_spliced(tokens, ids, nodes, batch.node_sample_index)
    np.testing.assert_array_equal(np.asarray(spliced), expected)
    np.testing.assert_array_equal(np.asarray(spliced)[1], tokens[1])  # text-only row untouched
    np.testing.assert_array_equal(np.asarray(spliced)[2, 6:11], nodes[3:8])  # left-padded row: its 5 atoms in order
    assert not np.any(np.asarray(spliced) == POISON)
    assert np.asarray(S.graph_slot_mismatch(ids, batch.node_sample_index)).tolist() == [0, 0, 0]


def test_validation_path_raises_on_slot_atom_mismatch():
    ids, batch = build_batch()
    ids[1, 7] = IMG  # a slot in the text-only row, which has no atoms
    tokens = jnp.zeros((3, 12, 4))
    nodes = jnp.ones((16, 4))
    assert np.asarray(S.graph_slot_mismatch(ids, batch.node_sample_index)).tolist() == [0, 1, 0]
    splice = jax.jit(lambda t, i, n, r: S.splice_graph_embeddings(t, i, n, r, validate=True))
    with pytest.raises(Exception, match=r"row 1: \+1"):
        jax.block_until_ready(splice(tokens, ids, nodes, batch.node_sample_index))
    ids[1, 7] = PAD
    jax.block_until_ready(splice(tokens, ids, nodes, batch.node_sample_index))  # consistent batch: no error


def test_labels_on_slots_are_ignored():
    ids, _ = build_batch()
    labels = np.where(ids == IMG, 7, ids)
    masked = np.asarray(S.ignore_graph_slots(jnp.asarray(labels), jnp.asarray(ids)))
    assert np.all(masked[ids == IMG] == IGNORE_INDEX) and np.all(masked[ids != IMG] == ids[ids != IMG])


def test_gradients_reach_the_projector_and_not_the_frozen_tower():
    ids, batch = build_batch()
    device_batch = jax.device_put(batch)
    gin = GIN(GraphConfig(num_layers=2, hidden_size=16), rngs=nnx.Rngs(0))
    projector = Projector(16, 6, rngs=nnx.Rngs(1))
    gin_def, gin_params, gin_rest = nnx.split(gin, nnx.Param, ...)
    proj_def, proj_params = nnx.split(projector)
    tokens = jnp.asarray(np.random.default_rng(1).normal(size=(3, 12, 6)), jnp.float32)
    weights = jnp.asarray(np.random.default_rng(2).normal(size=(3, 12, 6)), jnp.float32)

    def loss(gin_params, proj_params, freeze):
        tower = nnx.merge(gin_def, gin_params, gin_rest)
        atoms = tower(device_batch.graphs, graph_batch.node_mask(device_batch))
        if freeze:
            atoms = jax.lax.stop_gradient(atoms)
        projected = nnx.merge(proj_def, proj_params)(atoms)
        spliced = S.splice_graph_embeddings(tokens, ids, projected, device_batch.node_sample_index)
        return jnp.sum(spliced * weights)

    gin_grads, proj_grads = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(gin_params, proj_params, True)
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(gin_grads))
    # d loss / d bias = sum of the loss weights over graph slots; d / d kernel = sum_slots atom^T weight.
    slots = ids == IMG
    np.testing.assert_allclose(np.asarray(proj_grads["linear_in"]["bias"][...]), np.asarray(weights)[slots].sum(0),
                               rtol=1e-5, atol=1e-5)
    atoms = np.asarray(gin(device_batch.graphs, graph_batch.node_mask(device_batch)))
    slot_atoms = np.concatenate([atoms[0:3], atoms[3:8]])  # row 0's slots, then row 2's
    expected_kernel = slot_atoms.T @ np.asarray(weights)[slots]
    np.testing.assert_allclose(np.asarray(proj_grads["linear_in"]["kernel"][...]), expected_kernel, rtol=1e-4,
                               atol=1e-4)
    # Without the stop-gradient the tower would receive gradients: the check above can fail.
    unfrozen, _ = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(gin_params, proj_params, False)
    assert any(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(unfrozen))


def test_splice_under_a_data_parallel_mesh_matches_single_device():
    mesh = build_mesh(MeshConfig(data=-1))
    assert mesh.shape["data"] == 8
    rng = np.random.default_rng(3)
    graphs = [smiles_to_graph(s) if s else None for s in ["CCO", None, "c1ccccc1", "O", None, "CCN", "C#N", "CC"]]
    ids = np.full((8, 16), PAD, np.int32)
    for row, graph in enumerate(graphs):
        prompt, _ = GS.expand_image_placeholder([5, IMG, 6] if graph else [5, 6], graph.num_nodes if graph else None)
        ids[row, :len(prompt)] = prompt
    batch, _ = G.batch_graphs(graphs, G.GraphBudget(32, 64, 9))
    tokens = rng.normal(size=(8, 16, 4)).astype(np.float32)
    nodes = rng.normal(size=(32, 4)).astype(np.float32)
    single = np.asarray(jax.jit(S.splice_graph_embeddings)(tokens, ids, nodes, batch.node_sample_index))
    rows = NamedSharding(mesh, PartitionSpec("data"))
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded_fn = jax.jit(S.splice_graph_embeddings, in_shardings=(rows, rows, replicated, replicated),
                         out_shardings=rows)
    sharded = sharded_fn(jax.device_put(tokens, rows), jax.device_put(ids, rows), nodes, batch.node_sample_index)
    assert sharded.sharding.spec == PartitionSpec("data")
    np.testing.assert_array_equal(np.asarray(sharded), single)
    np.testing.assert_array_equal(single, hand_spliced(tokens, ids, nodes, batch.node_sample_index))


# --------------------------------------------------------------------------------------------------
# The multimodal wrapper around the Llama


TINY = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                   head_dim=8, rope_theta=10000.0, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def tiny_model():
    from omnimol_jax.model.omnimol import OmniMolModel

    return OmniMolModel(TINY, GraphConfig(num_layers=2, hidden_size=12), rngs=nnx.Rngs(0))


@nnx.jit
def forward(model, ids, graphs):
    return model(ids, graphs)


@nnx.jit
def forward_with_cache(model, ids, graphs, cache):
    return model(ids, graphs, cache=cache)


def test_wrapper_equals_llama_on_hand_spliced_embeddings(tiny_model):
    ids, batch = build_batch()
    ids = np.where(ids == IMG, IMG, ids % TINY.vocab_size).astype(np.int32)
    device_batch = jax.device_put(batch)
    out = forward(tiny_model, jnp.asarray(ids), device_batch)
    projected = np.asarray(nnx.jit(lambda m, g: m.encode_graphs(g))(tiny_model, device_batch))
    token_embeddings = np.asarray(tiny_model.language_model.embed(jnp.maximum(jnp.asarray(ids), 0)))
    spliced = hand_spliced(token_embeddings, ids, projected, batch.node_sample_index)
    reference = nnx.jit(lambda lm, x: lm(inputs_embeds=x))(tiny_model.language_model, jnp.asarray(spliced))
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(reference.logits), rtol=1e-6, atol=1e-6)
    assert out.logits.shape == (3, 12, TINY.vocab_size) and np.all(np.isfinite(np.asarray(out.logits)))
    # The text-only row does not depend on the graphs at all.
    text_only = forward(tiny_model, jnp.asarray(ids[1:2]), None)
    np.testing.assert_allclose(np.asarray(out.logits[1]), np.asarray(text_only.logits[0]), rtol=1e-6, atol=1e-6)


def test_wrapper_decodes_with_kv_cache_after_a_graph_prefill(tiny_model):
    from omnimol_jax.model.kv_cache import init_kv_cache

    ids, batch = build_batch(seq_len=10)
    ids = np.where(ids == IMG, IMG, ids % TINY.vocab_size).astype(np.int32)
    device_batch = jax.device_put(batch)
    next_tokens = jnp.asarray([[3], [4], [5]], jnp.int32)
    full = forward(tiny_model, jnp.concatenate([jnp.asarray(ids), next_tokens], axis=1), device_batch)
    cache = init_kv_cache(TINY, batch_size=3, max_length=16)
    prefill = forward_with_cache(tiny_model, jnp.asarray(ids), device_batch, cache)
    step = forward_with_cache(tiny_model, next_tokens, None, prefill.cache)
    np.testing.assert_allclose(np.asarray(step.logits[:, 0]), np.asarray(full.logits[:, -1]), rtol=1e-5, atol=1e-5)


def test_wrapper_passes_gradients_to_the_tower(tiny_model):
    """Freezing is the trainer's parameter filter (tests/test_train.py), not a stop_gradient in the model: a
    run that unfreezes the tower must be able to train it."""
    ids, batch = build_batch()
    ids = np.where(ids == IMG, IMG, ids % TINY.vocab_size).astype(np.int32)
    device_batch = jax.device_put(batch)
    graphdef, params, rest = nnx.split(tiny_model, nnx.Param, ...)

    def loss(params):
        model = nnx.merge(graphdef, params, rest)
        return jnp.mean(model(jnp.asarray(ids), device_batch).logits ** 2)

    grads = jax.jit(jax.grad(loss))(params)
    tower = jax.tree.leaves(grads["graph_tower"])
    assert tower and any(np.any(np.asarray(g) != 0) for g in tower)
    assert all(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(grads["projector"]))


def test_wrapper_with_sharded_parameters_matches_unsharded(tiny_model):
    from omnimol_jax.data.loader import place_batch
    from omnimol_jax.sharding import batch_sharding, shard_module, use_mesh

    ids, batch = build_batch()
    ids = np.where(ids == IMG, IMG, ids % TINY.vocab_size).astype(np.int32)
    device_batch = jax.device_put(batch)
    expected = np.asarray(forward(tiny_model, jnp.asarray(ids), device_batch).logits)
    mesh = build_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sharded = shard_module(nnx.clone(tiny_model), mesh)
    kernel = sharded.projector.linear_in.kernel[...]
    assert kernel.sharding.spec == PartitionSpec(None, "fsdp")  # ("projector_in", "embed") -> (None, fsdp)
    with use_mesh(mesh):
        inputs = place_batch({"input_ids": ids, "graphs": batch}, batch_sharding(mesh))
        assert inputs["input_ids"].sharding.spec == PartitionSpec()  # 3 rows do not split 4 ways: replicated
        logits = forward(sharded, inputs["input_ids"], inputs["graphs"]).logits
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-5, atol=1e-5)

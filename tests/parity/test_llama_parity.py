"""Logit parity with transformers.LlamaForCausalLM (torch, fp32) on random tiny configs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_reference import torch_logits, torch_twin

from omnimol_jax.config import model_config_from_preset
from omnimol_jax.model.llama import LlamaForCausalLM

TOLERANCE = 1e-4

CONFIGS = {
    "gqa_default_rope_tied": dict(),
    "gqa_llama3_rope_untied": dict(rope_type="llama3", rope_factor=8.0, rope_low_freq_factor=1.0,
                                   rope_high_freq_factor=4.0, rope_original_max_position_embeddings=64,
                                   rope_theta=500000.0, tie_word_embeddings=False),
    "mha_linear_rope_tied": dict(num_kv_heads=4, rope_type="linear", rope_factor=2.0),
    "mqa_llama3_rope_tied": dict(num_kv_heads=1, rope_type="llama3", rope_factor=32.0,
                                 rope_original_max_position_embeddings=128, rope_theta=500000.0),
}


@pytest.fixture(scope="module", params=list(CONFIGS), ids=list(CONFIGS))
def pair(request):
    config = model_config_from_preset("tiny", **CONFIGS[request.param])
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(7))
    forward = jax.jit(lambda m, ids, mask, pos: m(ids, attention_mask=mask, positions=pos).logits)
    return config, model, torch_twin(config, model), forward


@pytest.mark.parametrize("seq_len", [7, 500])
def test_right_padded_batch(pair, seq_len):
    config, model, twin, forward = pair
    rng = np.random.default_rng(seq_len)
    ids = rng.integers(3, config.vocab_size, (3, seq_len))
    lengths = [seq_len, seq_len - 3, max(1, seq_len // 2)]
    mask = (np.arange(seq_len)[None] < np.array(lengths)[:, None]).astype(np.int32)
    ours = np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(mask), None))
    ref = torch_logits(twin, ids, mask)
    for row, n in enumerate(lengths):  # padded positions carry no meaning in either implementation
        assert np.abs(ours[row, :n] - ref[row, :n]).max() <= TOLERANCE


@pytest.mark.parametrize("seq_len", [7, 500])
def test_left_padded_batch_with_positions(pair, seq_len):
    config, model, twin, forward = pair
    rng = np.random.default_rng(100 + seq_len)
    ids = rng.integers(3, config.vocab_size, (2, seq_len))
    pad = [0, seq_len // 3]
    mask = (np.arange(seq_len)[None] >= np.array(pad)[:, None]).astype(np.int32)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    ours_explicit = np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(positions)))
    ours_default = np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(mask), None))
    ref = torch_logits(twin, ids, mask, positions)
    for row, p in enumerate(pad):
        assert np.abs(ours_explicit[row, p:] - ref[row, p:]).max() <= TOLERANCE
    # default positions count real tokens, so left padding needs no explicit positions
    np.testing.assert_array_equal(ours_default, ours_explicit)


def test_parity_is_not_vacuous(pair):
    """A perturbed weight must break parity: the comparison above really sees the weights."""
    config, model, twin, forward = pair
    ids = np.random.default_rng(0).integers(3, config.vocab_size, (1, 16))
    mask = np.ones_like(ids)
    ref = torch_logits(twin, ids, mask)
    layer = model.layers[0].mlp.down_proj
    original = layer.kernel.get_value()
    layer.kernel.set_value(original * 1.01)
    try:
        perturbed = np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(mask), None))
    finally:
        layer.kernel.set_value(original)
    assert np.abs(perturbed - ref).max() > TOLERANCE


def test_jax_attention_impl_matches_einsum():
    config = model_config_from_preset("tiny", attention_impl="einsum")
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(1))
    other = LlamaForCausalLM(model_config_from_preset("tiny", attention_impl="jax"), rngs=nnx.Rngs(1))
    ids = jnp.asarray(np.random.default_rng(1).integers(3, config.vocab_size, (2, 33)))
    mask = jnp.asarray((np.arange(33)[None] < np.array([[33], [20]])).astype(np.int32))
    a = model(ids, attention_mask=mask).logits
    b = other(ids, attention_mask=mask).logits
    assert np.abs(np.asarray(a)[1, :20] - np.asarray(b)[1, :20]).max() < 1e-5
    assert np.abs(np.asarray(a)[0] - np.asarray(b)[0]).max() < 1e-5


@pytest.mark.parametrize("impl", ["blockwise", "block_sparse"])
@pytest.mark.parametrize("block", [8, 12])  # 12: the last block is shorter (block_sparse pads to 36)
def test_blockwise_attention_equals_einsum_in_outputs_and_gradients_with_padding_and_packing(block, impl):
    """blockwise skips causally masked key blocks and rematerialises each block; block_sparse skips every tile the
    row's mask leaves empty (causal, the other segment, padding) with its own backward pass: same numbers."""
    import dataclasses

    config = model_config_from_preset("tiny", attention_impl="einsum")
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(1))
    other = LlamaForCausalLM(dataclasses.replace(config, attention_impl=impl, attention_block=block),
                             rngs=nnx.Rngs(1))
    rng = np.random.default_rng(2)
    ids = jnp.asarray(rng.integers(3, config.vocab_size, (2, 32)))
    mask = jnp.asarray((np.arange(32)[None] < np.array([[32], [21]])).astype(np.int32))  # row 1 right-padded
    segments = np.where(np.arange(32) < 13, 1, 2)[None].repeat(2, 0)  # two packed samples per row
    positions = jnp.asarray(np.where(segments == 1, np.arange(32), np.arange(32) - 13), jnp.int32)
    real = np.asarray(mask).astype(bool)
    # block_sparse also gives padding queries the dense kernel's answer (the MoGE aux loss reads pad positions);
    # blockwise gives a padding query in a block before the last the mean of the values up to that block only.
    compared = np.ones_like(real) if impl == "block_sparse" else real

    def run(m, **kw):
        return m(ids, attention_mask=mask, **kw).logits

    for kw in ({}, {"segment_ids": jnp.asarray(segments), "positions": positions}):
        a, b = np.asarray(run(model, **kw)), np.asarray(run(other, **kw))
        assert np.abs(a - b)[compared].max() < 1e-5
    # Equal numbers would also come from a silent fallback to einsum: block_sparse's program branches per tile.
    program = str(jax.make_jaxpr(lambda m: run(m))(other))
    assert ("cond[" in program) == (impl == "block_sparse")

    def loss(m):
        logits = m(ids, attention_mask=mask, segment_ids=jnp.asarray(segments), positions=positions).logits
        return jnp.sum(jnp.where(jnp.asarray(compared)[..., None], jnp.sin(logits), 0.0))

    grads_a = nnx.to_flat_state(nnx.grad(loss)(model))
    grads_b = dict(nnx.to_flat_state(nnx.grad(loss)(other)))
    for path, value in grads_a:  # fp32 sums over 64 positions x vocab: 1e-5 of each gradient's scale
        expected = np.asarray(value.get_value())
        scale = max(1.0, float(np.abs(expected).max()))
        np.testing.assert_allclose(np.asarray(grads_b[path].get_value()), expected, atol=1e-5 * scale, rtol=0,
                                   err_msg=str(path))

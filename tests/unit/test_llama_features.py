"""Remat policies, packed sequences (segment ids) and bf16 compute."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from omnimol_jax.checkpoint import assign_params, module_params
from omnimol_jax.config import model_config_from_preset
from omnimol_jax.model.llama import LlamaForCausalLM

CONFIG = model_config_from_preset("tiny")


def _loss_and_grads(config, ids):
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(2))
    graphdef, params = nnx.split(model, nnx.Param)

    def loss_fn(p):
        logits = nnx.merge(graphdef, p)(ids[:, :-1]).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), ids[:, 1:]).mean()

    return jax.jit(jax.value_and_grad(loss_fn))(params)


@pytest.mark.parametrize("policy", ["full", "dots", "dots_with_no_batch_dims", "save_attention_out"])
def test_remat_policies_give_the_same_loss_and_gradients(policy):
    ids = jnp.asarray(np.random.default_rng(0).integers(3, CONFIG.vocab_size, (2, 17)), jnp.int32)
    loss, grads = _loss_and_grads(CONFIG, ids)
    loss_r, grads_r = _loss_and_grads(dataclasses.replace(CONFIG, remat_policy=policy), ids)
    assert abs(float(loss) - float(loss_r)) <= 1e-6
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_packed_segments_equal_separate_forwards():
    model = LlamaForCausalLM(CONFIG, rngs=nnx.Rngs(4))
    rng = np.random.default_rng(1)
    first, second = rng.integers(3, CONFIG.vocab_size, 9), rng.integers(3, CONFIG.vocab_size, 6)
    packed = np.concatenate([first, second, [0, 0]])[None].astype(np.int32)
    segment_ids = np.array([[1] * 9 + [2] * 6 + [0, 0]], np.int32)
    positions = np.array([list(range(9)) + list(range(6)) + [0, 0]], np.int32)
    out = np.asarray(model(jnp.asarray(packed), segment_ids=jnp.asarray(segment_ids), positions=jnp.asarray(positions),
                           attention_mask=jnp.asarray(segment_ids > 0)).logits)
    alone_first = np.asarray(model(jnp.asarray(first[None], jnp.int32)).logits)
    alone_second = np.asarray(model(jnp.asarray(second[None], jnp.int32)).logits)
    assert np.abs(out[0, :9] - alone_first[0]).max() <= 1e-5
    assert np.abs(out[0, 9:15] - alone_second[0]).max() <= 1e-5
    # without segment ids the second sequence sees the first: the mask really matters
    leaky = np.asarray(model(jnp.asarray(packed), positions=jnp.asarray(positions)).logits)
    assert np.abs(leaky[0, 9:15] - alone_second[0]).max() > 1e-3


def test_bf16_compute_tracks_fp32():
    ids = jnp.asarray(np.random.default_rng(3).integers(3, CONFIG.vocab_size, (2, 64)), jnp.int32)
    fp32 = LlamaForCausalLM(CONFIG, rngs=nnx.Rngs(5))
    bf16 = LlamaForCausalLM(dataclasses.replace(CONFIG, dtype="bfloat16"), rngs=nnx.Rngs(5))
    params_bf16 = LlamaForCausalLM(dataclasses.replace(CONFIG, dtype="bfloat16", param_dtype="bfloat16"),
                                   rngs=nnx.Rngs(0))
    assign_params(params_bf16, module_params(fp32))  # the same weights, rounded to bf16
    ref = np.asarray(fp32(ids).logits)
    out = bf16(ids).logits
    assert out.dtype == jnp.bfloat16
    assert params_bf16.layers[0].mlp.up_proj.kernel.get_value().dtype == jnp.bfloat16
    for logits in (out, params_bf16(ids).logits):
        diff = np.abs(np.asarray(logits, np.float32) - ref)
        assert diff.max() < 0.05 * np.abs(ref).max() and diff.max() > 0  # close, but really computed in bf16
        assert (np.asarray(logits, np.float32).argmax(-1) == ref.argmax(-1)).mean() > 0.9


def test_inputs_embeds_path_equals_token_path():
    model = LlamaForCausalLM(CONFIG, rngs=nnx.Rngs(6))
    ids = jnp.asarray(np.random.default_rng(4).integers(3, CONFIG.vocab_size, (2, 12)), jnp.int32)
    np.testing.assert_array_equal(np.asarray(model(ids).logits),
                                  np.asarray(model(inputs_embeds=model.embed(ids)).logits))
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model(ids, inputs_embeds=model.embed(ids))

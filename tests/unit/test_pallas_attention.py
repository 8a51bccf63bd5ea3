"""The Pallas attention kernels, splash (TPU) and flash (GPU), in Pallas interpret mode on CPU against the einsum
kernel: outputs and every gradient for the real queries of packed and padded rows, grouped-query heads, a last block
shorter than the kernel's tiles, and the model sharded over 8 devices (the kernel under shard_map) against one
device."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from omnimol_jax.config import ConfigError, MeshConfig, model_config_from_preset
from omnimol_jax.model import attention, flash, splash
from omnimol_jax.model.llama import LlamaForCausalLM
from omnimol_jax.sharding import batch_sharding, build_mesh, create_sharded_model, state_shardings, use_mesh


def _packed_rows(batch, length):
    """Row 0: two packed samples and padding; row 1: one sample and padding; ids 1, 2 for samples, 0 for padding."""
    segments = np.zeros((batch, length), np.int32)
    segments[0, :70], segments[0, 70:150] = 1, 2
    segments[1, :180] = 1
    return segments


KERNELS = {
    "splash-tiles-128": lambda q, k, v, s: splash.splash_attention(q, k, v, s, block_q=128, block_kv=128,
                                                                   interpret=True),
    "splash-one-tile": lambda q, k, v, s: splash.splash_attention(q, k, v, s, block_q=512, block_kv=512,
                                                                  interpret=True),
    "flash-tiles-64": lambda q, k, v, s: flash.flash_attention(q, k, v, s, block=64, interpret=True),
}


@pytest.mark.parametrize("kernel", KERNELS)
def test_the_kernel_equals_einsum_on_real_queries_in_outputs_and_gradients(kernel):
    # 200 tokens: padded to 256 for the kernel's tiles (a short last block); 4 query heads over 2 KV heads
    b, s, h, kv, d = 2, 200, 4, 2, 16
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in
               ((b, s, h, d), (b, s, kv, d), (b, s, kv, d)))
    segments = _packed_rows(b, s)
    real = segments > 0
    slots = np.arange(s)
    mask = jnp.asarray((slots[None, :] <= slots[:, None])[None] & real[:, None, :]
                       & (segments[:, :, None] == segments[:, None, :]))
    kernel_segments = splash.kernel_segment_ids(jnp.asarray(real), jnp.asarray(segments))
    cotangent = jnp.asarray(rng.normal(size=(b, s, h, d)), jnp.float32) * jnp.asarray(real)[:, :, None, None]

    def run_splash(q, k, v):
        return KERNELS[kernel](q, k, v, kernel_segments)

    def run_einsum(q, k, v):
        return attention.einsum_attention(q, k, v, mask)

    out, expected = run_splash(q, k, v), run_einsum(q, k, v)
    assert out.shape == expected.shape
    assert float(jnp.abs(out - expected)[real].max()) < 2e-6
    grads = jax.grad(lambda *a: jnp.sum(run_splash(*a) * cotangent), argnums=(0, 1, 2))(q, k, v)
    expected_grads = jax.grad(lambda *a: jnp.sum(run_einsum(*a) * cotangent), argnums=(0, 1, 2))(q, k, v)
    for name, got, want in zip("qkv", grads, expected_grads):
        scale = float(jnp.abs(want).max())
        assert float(jnp.abs(got - want).max()) < 1e-5 * scale, name


def test_block_sizes_round_to_lanes_and_pad_to_whole_tiles():
    assert splash.block_sizes(200, 512, 512) == (256, 256, 256)
    assert splash.block_sizes(2048, 512, 1024) == (512, 1024, 2048)
    assert splash.block_sizes(600, 256, 384) == (256, 384, 768)


@pytest.mark.parametrize("impl", ["splash", "flash"])
def test_the_model_with_a_pallas_kernel_sharded_equals_einsum_on_one_device(impl):
    """Logits of real tokens and every parameter gradient: the kernel under shard_map on a 2x2x2 mesh (rows over
    data, heads over tensor) against the einsum kernel on one device, with packed and right-padded rows; the program
    calls the Pallas kernel (no silent fallback)."""
    config = model_config_from_preset("tiny", tie_word_embeddings=False, attention_impl="einsum", attention_block=32)
    rng = np.random.default_rng(1)
    ids = rng.integers(3, config.vocab_size, (8, 40)).astype(np.int32)
    lengths = np.array([40, 33, 20, 40, 7, 39, 12, 40])
    attention_mask = (np.arange(40)[None] < lengths[:, None]).astype(np.int32)
    segment_ids = np.where(np.arange(40)[None] < np.array([[17], [9], [40], [25], [1], [30], [5], [21]]), 1, 2)
    segment_ids = (segment_ids * attention_mask).astype(np.int32)

    def loss(model, i, a, seg):
        logits = model(i, attention_mask=a, segment_ids=seg).logits
        return jnp.sum(jnp.where(a[..., None] > 0, jnp.sin(logits), 0.0)), logits

    def run(model_config, mesh):
        model = create_sharded_model(lambda: LlamaForCausalLM(model_config, rngs=nnx.Rngs(3)), mesh)
        graphdef, state = nnx.split(model)
        data = batch_sharding(mesh)
        grad = jax.grad(lambda s, i, a, g: loss(nnx.merge(graphdef, s), i, a, g), has_aux=True)
        step = jax.jit(grad, in_shardings=(state_shardings(state, mesh), data, data, data))
        args = [jax.device_put(x, data) for x in (ids, attention_mask, segment_ids)]
        with use_mesh(mesh):
            program = str(jax.make_jaxpr(grad)(state, *args))
            grads, logits = step(state, *args)
        return dict(nnx.to_flat_state(grads)), np.asarray(logits), program

    ref_grads, ref_logits, _ = run(config, build_mesh(MeshConfig(1, 1, 1, 1), devices=jax.devices()[:1]))
    grads, logits, program = run(dataclasses.replace(config, attention_impl=impl), build_mesh(MeshConfig(2, 2, 2, 1)))
    assert "pallas_call" in program
    real = attention_mask.astype(bool)
    assert np.abs(logits[real] - ref_logits[real]).max() <= 1e-5
    for path, value in ref_grads.items():
        expected = np.asarray(value.get_value())
        np.testing.assert_allclose(np.asarray(grads[path].get_value()), expected,
                                   atol=1e-5 * max(1.0, float(np.abs(expected).max())), rtol=0, err_msg=str(path))


def test_splash_blocks_must_be_whole_lanes():
    with pytest.raises(ConfigError, match="model.splash_block_kv: must be a multiple of 128, got 100"):
        model_config_from_preset("tiny", attention_impl="splash", splash_block_kv=100)


@pytest.mark.parametrize("impl, platform, message", [
    ("splash", "gpu", "model.attention_impl: splash is a TPU kernel (Pallas), not for gpu; use flash"),
    ("flash", "tpu", "model.attention_impl: flash is a GPU kernel (Pallas), not for tpu; use splash"),
])
def test_a_kernel_on_the_other_accelerator_is_refused_naming_the_right_one(impl, platform, message, monkeypatch):
    from omnimol_jax.model import llama

    monkeypatch.setattr(llama, "active_platform", lambda: platform)
    model = LlamaForCausalLM(model_config_from_preset("tiny", attention_impl=impl), rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError) as err:
        model(jnp.ones((1, 8), jnp.int32))
    assert str(err.value) == message

"""KV-cache decoding reproduces the full forward's logits."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from omnimol_jax.config import model_config_from_preset
from omnimol_jax.model.kv_cache import init_kv_cache
from omnimol_jax.model.llama import LlamaForCausalLM

CONFIG = model_config_from_preset("tiny", rope_type="llama3", rope_factor=4.0,
                                  rope_original_max_position_embeddings=32)


@pytest.fixture(scope="module")
def model():
    return LlamaForCausalLM(CONFIG, rngs=nnx.Rngs(11))


@jax.jit
def _step(model, cache, ids, mask):
    out = model(ids, attention_mask=mask, cache=cache)
    return out.logits, out.cache


@pytest.mark.parametrize("prefill_chunks", [[10], [4, 6], [1] * 10])
def test_decode_equals_full_forward(model, prefill_chunks):
    rng = np.random.default_rng(5)
    total = 24
    ids = rng.integers(3, CONFIG.vocab_size, (3, total)).astype(np.int32)
    left_pad = np.array([0, 5, 9])  # rows of different prompt lengths, left padded
    mask = (np.arange(total)[None] >= left_pad[:, None]).astype(np.int32)
    full = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits)

    cache = init_kv_cache(CONFIG, 3, 32)
    pieces, start = [], 0
    for size in prefill_chunks + [1] * (total - sum(prefill_chunks)):  # prefill, then one token at a time
        logits, cache = _step(model, cache, ids[:, start:start + size], mask[:, start:start + size])
        pieces.append(np.asarray(logits))
        start += size
    decoded = np.concatenate(pieces, axis=1)
    assert int(cache.index) == total
    np.testing.assert_array_equal(np.asarray(cache.num_valid), total - left_pad)
    valid = mask.astype(bool)
    assert np.abs(decoded[valid] - full[valid]).max() <= 1e-5


def test_cache_really_carries_context(model):
    """Decoding the last token with an empty cache must differ from decoding it after its prefix."""
    ids = jnp.asarray(np.random.default_rng(1).integers(3, CONFIG.vocab_size, (1, 9)), jnp.int32)
    ones = jnp.ones_like(ids)
    _, cache = _step(model, init_kv_cache(CONFIG, 1, 16), ids[:, :8], ones[:, :8])
    with_context, _ = _step(model, cache, ids[:, 8:], ones[:, 8:])
    alone, _ = _step(model, init_kv_cache(CONFIG, 1, 16), ids[:, 8:], ones[:, 8:])
    assert np.abs(np.asarray(with_context) - np.asarray(alone)).max() > 1e-3


@pytest.mark.parametrize("impl,block", [("einsum", 128), ("blockwise", 4), ("block_sparse", 4), ("block_sparse", 5)])
def test_fresh_cache_prefill_equals_prefill_over_every_slot(impl, block):
    """fresh_cache=True (a one-chunk prefill into an empty cache) attends over the prompt's own keys with the
    configured kernel, skipping masked blocks: the logits, the cache and what decodes after it are those of the
    prefill over every cache slot."""
    import dataclasses

    config = dataclasses.replace(CONFIG, attention_impl=impl, attention_block=block)
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(11))
    rng = np.random.default_rng(6)
    ids = rng.integers(3, config.vocab_size, (3, 13)).astype(np.int32)
    left_pad = np.array([0, 5, 12])  # the last row has one real token
    mask = (np.arange(13)[None] >= left_pad[:, None]).astype(np.int32)
    nxt = jnp.asarray(rng.integers(3, config.vocab_size, (3, 1)), jnp.int32)

    @functools.partial(jax.jit, static_argnums=3)
    def prefill_then_step(model, ids, mask, fresh):
        out = model(ids, attention_mask=mask, cache=init_kv_cache(config, 3, 20), fresh_cache=fresh)
        step = model(nxt, attention_mask=jnp.ones((3, 1), jnp.int32), cache=out.cache)
        return out.logits, out.cache, step.logits

    logits_a, cache_a, step_a = prefill_then_step(model, jnp.asarray(ids), jnp.asarray(mask), True)
    logits_b, cache_b, step_b = prefill_then_step(model, jnp.asarray(ids), jnp.asarray(mask), False)
    valid = mask.astype(bool)
    assert np.abs(np.asarray(logits_a)[valid] - np.asarray(logits_b)[valid]).max() <= 1e-5
    np.testing.assert_array_equal(np.asarray(cache_a.valid), np.asarray(cache_b.valid))
    for a, b in zip(cache_a.keys + cache_a.values, cache_b.keys + cache_b.values):  # real slots only
        assert np.abs(np.asarray(a)[:, :13][valid] - np.asarray(b)[:, :13][valid]).max() <= 1e-5
    assert np.abs(np.asarray(step_a) - np.asarray(step_b)).max() <= 1e-5
    # ...and it really attends over the prompt's 13 keys only: no score tensor spans the 20 cache slots.
    def score_widths(fresh):
        jaxpr = jax.make_jaxpr(lambda m, i, k: m(i, attention_mask=k, cache=init_kv_cache(config, 3, 20),
                                                 fresh_cache=fresh).logits)(model, jnp.asarray(ids), jnp.asarray(mask))
        return {dim for eqn in _equations(jaxpr.jaxpr) if eqn.primitive.name == "dot_general"
                for v in eqn.outvars for dim in v.aval.shape}

    assert 20 in score_widths(False) and 20 not in score_widths(True)
    with pytest.raises(ValueError, match="fresh_cache"):
        model(jnp.asarray(ids), attention_mask=jnp.asarray(mask), fresh_cache=True)


def _equations(jaxpr):
    """Every equation of a jaxpr, sub-jaxprs (scan, cond, checkpoint, custom_vjp) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _equations(inner)

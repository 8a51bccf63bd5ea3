"""Llama decoder in Flax NNX, numerically matching `transformers.LlamaForCausalLM`.

RMSNorm, rotate-half RoPE (default / linear / llama3 frequency scaling), grouped-query attention,
SwiGLU MLP, tied or untied embeddings. Attention masks combine causality, key padding and (for packed
sequences) segment ids. A functional KV cache (`KVCache`) serves decoding: keys are written at slot
`cache.index` and every query attends to the valid slots at or before its own.

Every parameter carries `logical_axes` metadata and activations are constrained by logical name; the
mapping to mesh axes lives only in `omnimol_jax.sharding`.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from omnimol_jax import loops
from omnimol_jax.config import ConfigError, ModelConfig
from omnimol_jax.model import attention, flash, splash
from omnimol_jax.model.dtypes import dtype_of
from omnimol_jax.model.head_cross_entropy import head_cross_entropy
from omnimol_jax.model.kv_cache import CACHE_AXES, KVCache
from omnimol_jax.model.layer_scan import Segment, run_segment, scan_plan
from omnimol_jax.model.lora import LoRA, fold_rng
from omnimol_jax.model.moge import MoGEFeedForward
from omnimol_jax.sharding import active_platform, constrain, per_shard

REMAT_POLICIES: dict[str, Optional[Callable]] = {
    "full": None,  # save nothing but the layer inputs
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attention_out": jax.checkpoint_policies.save_only_these_names("attention_out"),
}

BATCH_LENGTH_EMBED = ("activation_batch", "activation_length", "activation_embed")


# --------------------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nnx.Module):
    """y = w * x / sqrt(mean(x^2) + eps), statistics in fp32, as HF LlamaRMSNorm."""

    def __init__(self, dim: int, eps: float, param_dtype: jnp.dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        # HF casts back to the input dtype before the weight multiply; keep that order for bf16 parity.
        return self.scale[...].astype(x.dtype) * normed.astype(x.dtype)


class Projection(nnx.Module):
    """A bias-free linear map contracting the trailing `len(in_shape)` input dims with a kernel
    of shape in_shape + out_shape (e.g. [embed] -> [heads, head_dim])."""

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], logical_axes: Sequence[str], *,
                 dtype: jnp.dtype, param_dtype: jnp.dtype, init_std: float, rngs: nnx.Rngs):
        shape = tuple(in_shape) + tuple(out_shape)
        if len(logical_axes) != len(shape):
            raise ValueError(f"logical_axes {logical_axes} do not match kernel shape {shape}")
        self.num_contract = len(in_shape)
        self.dtype = dtype
        init = jax.nn.initializers.normal(stddev=init_std)
        self.kernel = nnx.Param(init(rngs.params(), shape, param_dtype), logical_axes=tuple(logical_axes))

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...].astype(self.dtype)
        return jnp.tensordot(x.astype(self.dtype), kernel, axes=self.num_contract)


class Embedding(nnx.Module):
    def __init__(self, vocab_size: int, dim: int, *, dtype: jnp.dtype, param_dtype: jnp.dtype, init_std: float,
                 rngs: nnx.Rngs):
        self.dtype = dtype
        init = jax.nn.initializers.normal(stddev=init_std)
        self.embedding = nnx.Param(init(rngs.params(), (vocab_size, dim), param_dtype),
                                   logical_axes=("vocab", "embed"))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied output head: x @ E^T."""
        return jnp.einsum("...d,vd->...v", x.astype(self.dtype), self.embedding[...].astype(self.dtype))


# --------------------------------------------------------------------------------------------------
# Rotary position embedding


def rope_inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """Per-pair inverse frequencies [head_dim/2], float32, as HF `ROPE_INIT_FUNCTIONS` computes them."""
    dim = config.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (1.0 / (np.float32(config.rope_theta) ** exponents)).astype(np.float32)
    if config.rope_type == "default":
        return inv_freq
    if config.rope_type == "linear":
        return (inv_freq / np.float32(config.rope_factor)).astype(np.float32)
    if config.rope_type == "llama3":
        factor = config.rope_factor
        low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
        old_context = config.rope_original_max_position_embeddings
        low_freq_wavelen = old_context / low
        high_freq_wavelen = old_context / high
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated smoothly.
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        return np.where(is_medium, smoothed, scaled).astype(np.float32)
    raise ValueError(f"unsupported rope_type {config.rope_type!r}")


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate-half RoPE on x [B, S, heads, head_dim] at integer positions [B, S]."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, S, D/2]
    angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


# --------------------------------------------------------------------------------------------------
# Attention and MLP


ADAPTER_IDS = {"q_proj": 0, "k_proj": 1, "v_proj": 2, "o_proj": 3, "gate_proj": 4, "up_proj": 5, "down_proj": 6}


def add_adapters(owner: nnx.Module, config: ModelConfig, shapes: dict, rngs: nnx.Rngs) -> None:
    """Attaches `<name>_lora` beside each targeted frozen projection `<name>` (when LoRA is enabled)."""
    if not config.lora.enabled:
        return
    for name, (in_shape, out_shape, in_axes, out_axes) in shapes.items():
        if name in config.lora.targets:
            setattr(owner, f"{name}_lora", LoRA(in_shape, out_shape, in_axes, out_axes, config.lora,
                                                compute_dtype=dtype_of(config.dtype), rngs=rngs))


def project(owner: nnx.Module, name: str, x: jax.Array, rng: Optional[jax.Array]) -> jax.Array:
    """Frozen projection plus its adapter's output (if it has one and it is not merged into the kernel)."""
    y = getattr(owner, name)(x)
    adapter = getattr(owner, f"{name}_lora", None)
    if adapter is not None and not adapter.merged:
        y = y + adapter(x, fold_rng(rng, ADAPTER_IDS[name])).astype(y.dtype)
    return y


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, h, kv, hd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        kw = dict(dtype=dtype_of(config.dtype), param_dtype=dtype_of(config.param_dtype),
                  init_std=config.initializer_range, rngs=rngs)
        shapes = {"q_proj": ((d,), (h, hd), ("embed",), ("q_heads", "head_dim")),
                  "k_proj": ((d,), (kv, hd), ("embed",), ("kv_heads", "head_dim")),
                  "v_proj": ((d,), (kv, hd), ("embed",), ("kv_heads", "head_dim")),
                  "o_proj": ((h, hd), (d,), ("q_heads", "head_dim"), ("embed",))}
        for name, (in_shape, out_shape, in_axes, out_axes) in shapes.items():
            setattr(self, name, Projection(in_shape, out_shape, in_axes + out_axes, **kw))
        add_adapters(self, config, shapes, rngs)

    def __call__(self, x: jax.Array, positions: jax.Array, inv_freq: jax.Array, key_valid: jax.Array,
                 segment_ids: Optional[jax.Array], layer_cache: Optional[tuple[jax.Array, jax.Array]],
                 cache_index: Optional[jax.Array], rng: Optional[jax.Array] = None, fresh_cache: bool = False
                 ) -> tuple[jax.Array, Optional[tuple[jax.Array, jax.Array]]]:
        """fresh_cache (static): the cache is empty and this call fills it from slot 0 (a one-chunk prefill), so
        the queries attend to this call's keys only, with the configured kernel, instead of every cache slot."""
        cfg = self.config
        heads = ("activation_batch", "activation_length", "activation_heads", "activation_head_dim")
        kv_heads = ("activation_batch", "activation_length", "activation_kv_heads", "activation_head_dim")
        q = constrain(apply_rope(project(self, "q_proj", x, rng), positions, inv_freq), heads)
        k = constrain(apply_rope(project(self, "k_proj", x, rng), positions, inv_freq), kv_heads)
        v = constrain(project(self, "v_proj", x, rng), kv_heads)
        seq_len = x.shape[1]

        new_cache = None
        if layer_cache is not None:
            cache_k, cache_v = layer_cache
            new_cache = tuple(constrain(jax.lax.dynamic_update_slice(c, t.astype(c.dtype), (0, cache_index, 0, 0)),
                                        CACHE_AXES) for c, t in ((cache_k, k), (cache_v, v)))

        if layer_cache is None or fresh_cache:
            # Query and key slots coincide: mask[b, q, t] is causal, real keys only, and (packing) same segment.
            slots = jnp.arange(seq_len)
            mask = (slots[None, :] <= slots[:, None])[None] & key_valid[:, None, :seq_len]
            if segment_ids is not None:
                mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
            if cfg.attention_impl in ("splash", "flash"):
                out = self._pallas(q, k.astype(q.dtype), v.astype(q.dtype),
                                   splash.kernel_segment_ids(key_valid[:, :seq_len], segment_ids))
            else:
                out = self._attend(q, k.astype(q.dtype), v.astype(q.dtype), mask, cfg.attention_impl)
        else:
            # Decoding: every valid cache slot at or before each query's own slot.
            keys, values = new_cache
            query_slots = cache_index + jnp.arange(seq_len)
            mask = (jnp.arange(keys.shape[1])[None, :] <= query_slots[:, None])[None] & key_valid[:, None, :]
            out = self._attend(q, keys.astype(q.dtype), values.astype(q.dtype), mask,
                               "jax" if cfg.attention_impl == "jax" else "einsum")
        out = checkpoint_name(constrain(out, heads), "attention_out")
        return project(self, "o_proj", out, rng), new_cache

    def _attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, impl: str) -> jax.Array:
        block = self.config.attention_block
        if impl == "jax":
            return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=self.config.head_dim ** -0.5)
        if impl == "blockwise":
            return attention.causal_blockwise_attention(q, k, v, mask, block)
        if impl == "block_sparse":
            # Which tiles are live differs per row, so each device runs its own rows (XLA must not partition the
            # per-row lax.cond into selects over the whole batch).
            batch_heads = ("activation_batch", None, "activation_heads", None)
            batch_kv = ("activation_batch", None, "activation_kv_heads", None)
            return per_shard(lambda q, k, v, m: attention.block_sparse_attention(q, k, v, m, block),
                             (q, k, v, mask), (batch_heads, batch_kv, batch_kv, ("activation_batch", None, None)),
                             batch_heads, split_alike=[("activation_heads", "activation_kv_heads")])
        return attention.einsum_attention(q, k, v, mask)

    def _pallas(self, q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array) -> jax.Array:
        """splash (TPU) or flash (GPU): Pallas kernels, compiled on their platform, interpreted on CPU."""
        cfg = self.config
        impl, platform = cfg.attention_impl, active_platform()
        home = {"splash": "tpu", "flash": "gpu"}[impl]
        if platform not in (home, "cpu"):
            other = {"tpu": "splash", "gpu": "flash"}.get(platform, "blockwise")
            raise ConfigError(f"model.attention_impl: {impl} is a {home.upper()} kernel (Pallas), not for "
                              f"{platform}; use {other}")
        interpret = platform == "cpu"
        if impl == "splash":
            def kernel(q, k, v, s):
                return splash.splash_attention(q, k, v, s, block_q=cfg.splash_block_q, block_kv=cfg.splash_block_kv,
                                               interpret=interpret)
        else:
            def kernel(q, k, v, s):
                return flash.flash_attention(q, k, v, s, block=cfg.attention_block, interpret=interpret)
        # the kernels run per device on whole rows and heads (shard_map), as MaxText wraps splash
        batch_heads = ("activation_batch", None, "activation_heads", None)
        batch_kv = ("activation_batch", None, "activation_kv_heads", None)
        return per_shard(kernel, (q, k, v, segments), (batch_heads, batch_kv, batch_kv, ("activation_batch", None)),
                         batch_heads, split_alike=[("activation_heads", "activation_kv_heads")])


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        kw = dict(dtype=dtype_of(config.dtype), param_dtype=dtype_of(config.param_dtype),
                  init_std=config.initializer_range, rngs=rngs)
        shapes = {"gate_proj": ((d,), (f,), ("embed",), ("mlp",)),
                  "up_proj": ((d,), (f,), ("embed",), ("mlp",)),
                  "down_proj": ((f,), (d,), ("mlp",), ("embed",))}
        for name, (in_shape, out_shape, in_axes, out_axes) in shapes.items():
            setattr(self, name, Projection(in_shape, out_shape, in_axes + out_axes, **kw))
        add_adapters(self, config, shapes, rngs)

    def __call__(self, x: jax.Array, rng: Optional[jax.Array] = None) -> jax.Array:
        hidden = jax.nn.silu(project(self, "gate_proj", x, rng)) * project(self, "up_proj", x, rng)
        hidden = constrain(hidden, ("activation_batch", "activation_length", "activation_mlp"))
        return project(self, "down_proj", hidden, rng)


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, *, is_moe: bool = False, rngs: nnx.Rngs):
        param_dtype = dtype_of(config.param_dtype)
        self.is_moe = is_moe
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype)
        self.self_attn = Attention(config, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype)
        if is_moe:
            kw = dict(dtype=dtype_of(config.dtype), param_dtype=param_dtype, init_std=config.initializer_range)
            self.mlp = MoGEFeedForward(config, Projection, kw, rngs=rngs)
        else:
            self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x, inputs: "LayerInputs", layer_cache, rng=None, fresh_cache: bool = False):
        attn_out, new_cache = self.self_attn(self.input_layernorm(x), inputs.positions, inputs.inv_freq,
                                             inputs.key_valid, inputs.segment_ids, layer_cache, inputs.cache_index,
                                             fold_rng(rng, 0), fresh_cache)
        x = constrain(x + attn_out, BATCH_LENGTH_EMBED)
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            mlp_out, aux = self.mlp(h, inputs.token_mask, fold_rng(rng, 1))
        else:
            mlp_out, aux = self.mlp(h, fold_rng(rng, 1)), None
        x = constrain(x + mlp_out, BATCH_LENGTH_EMBED)
        return x, new_cache, aux


# --------------------------------------------------------------------------------------------------
# The model


class LayerInputs(NamedTuple):
    """What every decoder layer of one forward pass reads besides its activations and its cache slot."""

    positions: jax.Array             # [B, S] rotary positions
    inv_freq: jax.Array              # [head_dim / 2] rotary frequencies
    key_valid: jax.Array             # [B, K] which keys (cache slots or tokens) may be attended to
    segment_ids: Optional[jax.Array]  # [B, S] packed samples, or None
    cache_index: Optional[jax.Array]  # where this step's keys go in the cache, or None
    token_mask: jax.Array            # [B, S] real tokens (MoGE statistics and aux loss)


class CausalLMOutput(NamedTuple):
    logits: jax.Array
    cache: Optional[KVCache]
    hidden_states: Optional[jax.Array]
    # MoGE layers' outputs stacked over those layers: aux_loss [L], router_load [L, E], router_topk_weight [L],
    # router_assignments [L, B * S, E] (each real token's expert assignments, for per-task statistics).
    aux: dict


class LlamaForCausalLM(nnx.Module):
    """Decoder-only Llama. Parameter names follow HF (`model.layers.{i}.self_attn.q_proj` ->
    `layers[i].self_attn.q_proj.kernel`), which keeps the HF converter a plain table."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        config.validate()
        self.config = config
        dtype, param_dtype = dtype_of(config.dtype), dtype_of(config.param_dtype)
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=param_dtype,
                                      init_std=config.initializer_range, rngs=rngs)
        moe_layers = set(config.moge.layer_indices(config.num_layers))
        self.layers = nnx.List([DecoderLayer(config, is_moe=i in moe_layers, rngs=rngs)
                                for i in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype)
        if not config.tie_word_embeddings:
            self.lm_head = Projection((config.hidden_size,), (config.vocab_size,), ("embed", "vocab"), dtype=dtype,
                                      param_dtype=param_dtype, init_std=config.initializer_range, rngs=rngs)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        return self.embed_tokens(input_ids)

    def lm_logits(self, hidden: jax.Array) -> jax.Array:
        """The output head on final hidden states [..., d] -> [..., vocab] (tied to the embedding or not)."""
        return self.embed_tokens.attend(hidden) if self.config.tie_word_embeddings else self.lm_head(hidden)

    def chunked_cross_entropy(self, hidden: jax.Array, targets: jax.Array, chunk: int) -> jax.Array:
        """Per-position CE [B, T] (fp32) of the output head on hidden [B, T, d] against targets [B, T], `chunk`
        positions at a time. Each chunk's logits are made, reduced to log-sum-exp minus the target's logit, and
        dropped; the backward pass recomputes them chunk by chunk (head_cross_entropy.py: one fused pass writes
        d logits in the compute dtype). So [B, T, vocab] logits never exist: at Llama-3 vocab sizes they are the
        largest temporaries of a train step (3 x 16 GiB per v5p chip at 1B)."""
        tied = self.config.tie_word_embeddings
        head = self.embed_tokens if tied else self.lm_head
        weight = (head.embedding if tied else head.kernel)[...].astype(head.dtype)

        def chunk_ce(h_chunk, t_chunk):
            return head_cross_entropy(h_chunk, weight, t_chunk, tied, constrain)

        batch, length, dim = hidden.shape
        count = -(-length // chunk)
        if count == 1:  # one chunk holds everything: nothing to recompute
            return chunk_ce(hidden, targets)
        pad = count * chunk - length
        h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(batch, count, chunk, dim).swapaxes(0, 1)
        t = jnp.pad(targets, ((0, 0), (0, pad))).reshape(batch, count, chunk).swapaxes(0, 1)
        ce = loops.map_chunks(lambda inputs: chunk_ce(*inputs), (h, t))
        return ce.swapaxes(0, 1).reshape(batch, count * chunk)[:, :length]

    def _segments(self, scan: bool) -> Sequence[Segment]:
        """The layers as segments: the scan plan, or every layer on its own (unrolled)."""
        if not scan:
            return [Segment(i, 1, 1) for i in range(len(self.layers))]
        moe_layers = set(self.config.moge.layer_indices(self.config.num_layers))
        return scan_plan([i in moe_layers for i in range(len(self.layers))])

    def __call__(self, input_ids: Optional[jax.Array] = None, *, inputs_embeds: Optional[jax.Array] = None,
                 positions: Optional[jax.Array] = None, attention_mask: Optional[jax.Array] = None,
                 segment_ids: Optional[jax.Array] = None, cache: Optional[KVCache] = None,
                 return_hidden_states: bool = False, dropout_rng: Optional[jax.Array] = None,
                 fresh_cache: bool = False) -> CausalLMOutput:
        """Logits [B, S, vocab] for tokens (or precomputed embeddings, e.g. with spliced graph tokens).

        attention_mask [B, S]: 1 for real tokens (default all ones). positions [B, S]: default is the count
        of real tokens before each one, which is right for left or right padding and continues from the
        cache. segment_ids [B, S] (packed sequences; not with a cache): tokens attend only within their
        segment; pass positions too, restarting at 0 per segment.
        dropout_rng: enables LoRA dropout (training); None is deterministic.
        fresh_cache (static): `cache` is empty (index 0) and this call is the whole prefill, so attention runs over
        the prompt's own keys with the configured kernel (skipping masked blocks) instead of every cache slot.
        """
        cfg = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(dtype_of(cfg.dtype))
        batch, seq_len = x.shape[:2]
        x = constrain(x, BATCH_LENGTH_EMBED)
        mask = (jnp.ones((batch, seq_len), jnp.bool_) if attention_mask is None
                else attention_mask.astype(jnp.bool_))
        if cache is not None and segment_ids is not None:
            raise ValueError("segment_ids (packing) are for training; decoding with a cache takes attention_mask")
        if fresh_cache and cache is None:
            raise ValueError("fresh_cache=True needs the (empty) cache the prefill fills")
        if positions is None:
            offset = cache.num_valid[:, None] if cache is not None else 0
            positions = offset + jnp.maximum(jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1, 0)
        inv_freq = jnp.asarray(rope_inverse_frequencies(cfg))

        if cache is not None:
            key_valid = jax.lax.dynamic_update_slice(cache.valid, mask, (0, cache.index))
            cache_index = cache.index
        else:
            key_valid, cache_index = mask, None

        inputs = LayerInputs(positions, inv_freq, key_valid, segment_ids, cache_index, mask)
        new_keys, new_values, moe_aux = [], [], []  # moe_aux: dicts whose leaves lead with a MoGE-layer axis
        for segment in self._segments(scan=cfg.scan_layers and cache is None):
            if segment.repeats > 1:
                x, aux = run_segment(self.layers, segment, x, inputs, dropout_rng,
                                     _scan_checkpoint(cfg.remat_policy))
                moe_aux.extend(aux)
                continue
            layer_fn = _decoder_layer_call if cfg.remat_policy == "none" else _rematerialized(cfg.remat_policy)
            for i in range(segment.start, segment.stop):
                layer_cache = (cache.keys[i], cache.values[i]) if cache is not None else None
                x, updated, aux = layer_fn(self.layers[i], x, inputs, layer_cache, fold_rng(dropout_rng, i),
                                           fresh_cache)
                if updated is not None:
                    new_keys.append(updated[0])
                    new_values.append(updated[1])
                if aux is not None:
                    moe_aux.append(jax.tree.map(lambda a: a[None], aux))

        hidden = self.norm(x)
        logits = constrain(self.lm_logits(hidden), ("activation_batch", "activation_length", "activation_vocab"))
        new_cache = None
        if cache is not None:
            new_cache = KVCache(keys=tuple(new_keys), values=tuple(new_values), valid=key_valid,
                                index=cache.index + seq_len,
                                num_valid=cache.num_valid + mask.sum(axis=1, dtype=jnp.int32))
        stacked_aux = {k: jnp.concatenate([a[k] for a in moe_aux]) for k in moe_aux[0]} if moe_aux else {}
        return CausalLMOutput(logits=logits, cache=new_cache, hidden_states=hidden if return_hidden_states else None,
                              aux=stacked_aux)


def _decoder_layer_call(layer, x, inputs: LayerInputs, layer_cache, rng, fresh_cache: bool = False):
    return layer(x, inputs, layer_cache, rng, fresh_cache)


def _scan_checkpoint(policy: str):
    """How a scanned layer's pure call is wrapped: remat with the configured policy, or not at all. Inside a scan
    the loop already keeps XLA from merging the recomputation into the forward, so prevent_cse is off."""
    if policy == "none":
        return lambda fn: fn
    return lambda fn: jax.checkpoint(fn, policy=REMAT_POLICIES[policy], prevent_cse=False)


def _rematerialized(policy: str):
    """A layer call under `jax.checkpoint` with the layer's variables passed in as arguments.

    Why not `nnx.remat`: it writes the variables back after the call, and in a train step whose frozen weights
    come from outside the gradient trace (a frozen backbone) that write-back raises TraceContextError. A layer
    changes no variable in its forward pass, so a pure function of (variables, inputs) is all remat needs.
    """
    checkpoint_policy = REMAT_POLICIES[policy]

    def call(layer, x, inputs: LayerInputs, layer_cache, rng, fresh_cache: bool = False):
        graphdef, state = nnx.split(layer)

        def pure(state, x, inputs, layer_cache, rng):  # fresh_cache stays a Python bool (static)
            return nnx.merge(graphdef, state)(x, inputs, layer_cache, rng, fresh_cache)

        return jax.checkpoint(pure, policy=checkpoint_policy, prevent_cse=True)(state, x, inputs, layer_cache, rng)

    return call


def count_parameters(config: ModelConfig) -> int:
    """Parameter count from shapes only (nothing is allocated)."""
    abstract = nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
    return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(abstract, nnx.Param)))

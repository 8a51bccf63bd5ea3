"""The decoding cache: its type, its allocation, its logical axes, and the row operations beams and number
enumeration use (tile each row, gather rows)."""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from omnimol_jax.config import ModelConfig
from omnimol_jax.model.dtypes import dtype_of


class KVCache(NamedTuple):
    """Decoding state. keys/values: one [B, max_len, kv_heads, head_dim] array per layer.

    `valid[b, t]` says slot t of row b holds a real token; `index` is the next slot to write (shared by all
    rows, so left-padded prompts and per-row positions work). `num_valid[b]` counts real tokens of row b,
    i.e. the position of its next token.
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    valid: jax.Array
    index: jax.Array
    num_valid: jax.Array

    @property
    def max_length(self) -> int:
        return self.valid.shape[1]


CACHE_AXES = ("cache_batch", "cache_length", "cache_kv_heads", "cache_head_dim")


def init_kv_cache(config: ModelConfig, batch_size: int, max_length: int, dtype: Any = None) -> KVCache:
    dtype = dtype or dtype_of(config.dtype)
    shape = (batch_size, max_length, config.num_kv_heads, config.head_dim)
    return KVCache(
        keys=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
        values=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
        valid=jnp.zeros((batch_size, max_length), jnp.bool_),
        index=jnp.zeros((), jnp.int32),
        num_valid=jnp.zeros((batch_size,), jnp.int32),
    )


def kv_cache_bytes(config: ModelConfig, batch_size: int, max_length: int, dtype: Any = None) -> int:
    """Bytes of the keys and values `init_kv_cache(config, batch_size, max_length, dtype)` allocates."""
    itemsize = jnp.dtype(dtype or dtype_of(config.dtype)).itemsize
    return 2 * config.num_layers * batch_size * max_length * config.num_kv_heads * config.head_dim * itemsize


def kv_cache_logical_axes(config: ModelConfig) -> KVCache:
    """The cache's logical axes, mirroring its structure (for shardings of decode functions)."""
    layer = tuple(CACHE_AXES for _ in range(config.num_layers))
    return KVCache(keys=layer, values=layer, valid=("cache_batch", "cache_length"), index=(),
                   num_valid=("cache_batch",))


def tile_cache(cache: KVCache, times: int) -> KVCache:
    rep = functools.partial(jnp.repeat, repeats=times, axis=0)
    return KVCache(keys=tuple(map(rep, cache.keys)), values=tuple(map(rep, cache.values)), valid=rep(cache.valid),
                   index=cache.index, num_valid=rep(cache.num_valid))


def gather_cache(cache: KVCache, rows: jax.Array) -> KVCache:
    take = functools.partial(jnp.take, indices=rows, axis=0)
    return KVCache(keys=tuple(map(take, cache.keys)), values=tuple(map(take, cache.values)), valid=take(cache.valid),
                   index=cache.index, num_valid=take(cache.num_valid))

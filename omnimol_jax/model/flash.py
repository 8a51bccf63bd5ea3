"""Flash attention on GPU: jax's Pallas GPU kernel (`jax.experimental.pallas.ops.gpu.attention.mha`, Triton),
causal with segment ids, for our packed and padded rows.

The contract is splash's (`splash.py`): equal to the XLA kernels at every query with a real key; padding keys get
segment id -1 and padding queries see only padding keys. The sequence is padded to whole `block` tiles. The kernel
takes as many KV heads as query heads, so grouped KV heads are repeated (G x the K/V activations, still no
[S, S] scores in memory). On CPU it runs in Pallas interpret mode (the tests); on a GPU Triton compiles it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention as gpu_attention

from omnimol_jax.model.splash import PADDING_SEGMENT


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array, *, block: int,
                    interpret: bool) -> jax.Array:
    """q [B, S, H, D], k/v [B, S, KV, D], segments [B, S] from `splash.kernel_segment_ids` -> [B, S, H, D]."""
    b, s, h, d = q.shape
    groups = h // k.shape[2]
    if groups > 1:
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    tile = min(block, max(16, 1 << (s - 1).bit_length()))  # a power of two no longer than needed, at least 16
    padded = -(-s // tile) * tile
    if padded != s:
        extra = padded - s
        q, k, v = (jnp.pad(x, ((0, 0), (0, extra), (0, 0), (0, 0))) for x in (q, k, v))
        segments = jnp.pad(segments, ((0, 0), (0, extra)), constant_values=PADDING_SEGMENT)
    sizes = gpu_attention.BlockSizes(block_q=tile, block_k=tile, block_q_dkv=tile, block_kv_dkv=tile,
                                     block_q_dq=tile, block_kv_dq=tile)
    out = gpu_attention.mha(q, k, v, segments, sm_scale=d ** -0.5, causal=True, block_sizes=sizes,
                            interpret=interpret)
    return out[:, :s]

"""Splash attention: jax's Pallas TPU flash-attention kernel (`jax.experimental.pallas.ops.tpu.splash_attention`),
the one MaxText, Levanter and Tunix train with, for our packed and padded rows.

Same contract as the kernels of `attention.py` for every query with a real key (q [B, S, H, D], k and v [B, S, KV,
D], causal, within the query's segment, real keys only), without materialising any [S, S] block in HBM: the kernel
walks (query block, key block) tiles in VMEM with an online softmax and skips the tiles the causal mask and the
segment ids leave empty, forward and backward. Grouped-query attention reads each KV head once for its G query
heads (no repeated K/V). Padding keys get segment id -1, which no real query has; a padding query therefore sees
the padding keys up to itself (the XLA kernels give it the mean of all values instead): outputs of padding queries
differ, which nothing reads. The sequence is padded to whole blocks with more padding, so any length works.

On CPU the kernel runs in Pallas interpret mode (what the tests compare against einsum); on TPU it is compiled by
Mosaic. It is a TPU kernel: GPUs have no Mosaic.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_kernel as kernels,
    splash_attention_mask as masks,
)

LANES = 128  # the kernel's key blocks are multiples of the TPU's vector lanes
PADDING_SEGMENT = -1


def block_sizes(seq_len: int, block_q: int, block_kv: int) -> tuple[int, int, int]:
    """(query block, key block, padded length): blocks no longer than the lane-rounded sequence, and a length that
    both divide."""
    rounded = -(-seq_len // LANES) * LANES
    bq, bkv = min(block_q, rounded), min(block_kv, rounded)
    step = math.lcm(bq, bkv)
    return bq, bkv, -(-seq_len // step) * step


def kernel_segment_ids(key_valid: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    """[B, S] int32 segment ids the kernel masks with: the packing segment of each real token, -1 for padding."""
    segments = jnp.zeros(key_valid.shape, jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    return jnp.where(key_valid, segments, PADDING_SEGMENT)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array, *, block_q: int, block_kv: int,
                     interpret: bool) -> jax.Array:
    """q [B, S, H, D], k/v [B, S, KV, D], segments [B, S] from `kernel_segment_ids` -> [B, S, H, D]."""
    b, s, h, d = q.shape
    bq, bkv, padded = block_sizes(s, block_q, block_kv)
    if padded != s:
        extra = padded - s
        q, k, v = (jnp.pad(x, ((0, 0), (0, extra), (0, 0), (0, 0))) for x in (q, k, v))
        segments = jnp.pad(segments, ((0, 0), (0, extra)), constant_values=PADDING_SEGMENT)
    sizes = kernels.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                               block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    causal = masks.MultiHeadMask([masks.CausalMask((padded, padded))] * h)
    kernel = kernels.make_splash_mha(causal, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
    scaled = (q * (d ** -0.5)).astype(q.dtype)  # the kernel does not scale its scores

    def one_row(q, k, v, segment):
        return kernel(q, k, v, kernels.SegmentIds(q=segment, kv=segment))

    heads_first = (0, 2, 1, 3)  # [B, S, H, D] <-> [B, H, S, D], the kernel's layout
    out = jax.vmap(one_row)(scaled.transpose(heads_first), k.transpose(heads_first), v.transpose(heads_first),
                            segments)
    return out.transpose(heads_first)[:, :s]


def live_tiles(seq_len: int, block_q: int, block_kv: int) -> int:
    """(query block, key block) tiles the causal mask leaves non-empty, which the kernel computes (segment skipping
    depends on the data and is not counted: an upper bound for packed rows)."""
    bq, bkv, padded = block_sizes(seq_len, block_q, block_kv)
    return sum(min(padded // bkv, ((i + 1) * bq - 1) // bkv + 1) for i in range(padded // bq))


def train_costs(rows: int, seq_len: int, num_heads: int, num_kv_heads: int, head_dim: int, layers: int,
                block_q: int, block_kv: int, dtype_bytes: int) -> tuple[float, float]:
    """(FLOPs, HBM bytes) of the kernel's forward and backward in one train step over `rows` rows, counted
    analytically, since XLA's cost analysis does not see inside a Pallas call. Per live tile and query head: 2 tile
    matmuls forward (q k^T, p v) and 7 backward (the dq kernel recomputes q k^T and forms dp, dq; the dkv kernel
    recomputes q k^T and forms dp, dv, dk), each 2 x block_q x block_kv x head_dim FLOPs. Bytes: every q, o, dO, dq
    block once per pass, each live tile's K and V blocks (a GQA group's heads read them once per query head, an
    upper bound), dk and dv written once."""
    bq, bkv, padded = block_sizes(seq_len, block_q, block_kv)
    tiles = live_tiles(seq_len, block_q, block_kv)
    per_head_flops = 9 * 2 * bq * bkv * head_dim * tiles
    flops = float(rows * layers * num_heads * per_head_flops)
    vectors = padded * head_dim  # one [S, D] array of a head
    q_side = num_heads * (2 * vectors + 4 * vectors + 2 * vectors)            # fwd q,o; dq pass q,dO,o,dq; dkv q,dO
    kv_side = num_heads * tiles * bkv * head_dim * (2 + 2 + 2)                  # K,V per live tile in each pass
    kv_out = num_kv_heads * 2 * vectors                                          # dk, dv
    return flops, float(rows * layers * (q_side + kv_side + kv_out) * dtype_bytes)

"""Masked attention kernels in plain XLA: dense einsum, causal blockwise, and block-sparse.

Every kernel takes q [B, S, H, D], k and v [B, T, KV, D] (grouped-query: H = KV * G) and a boolean mask [B, S, T]
(True: the query may attend to the key), and returns [B, S, H, D]. Softmax runs in fp32 with masked scores at the
fp32 minimum, so a query with no unmasked key (padding) gets the mean of every value, as the dense kernel gives it
(blockwise: of the values up to its block's end, the same for the trailing padding of packed rows).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_MASKED = float(jnp.finfo(jnp.float32).min)


def einsum_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax(q k^T / sqrt(D)) v over all keys at once: [B, KV, G, S, T] fp32 scores."""
    b, s, h, d = q.shape
    kv = k.shape[2]
    grouped = q.reshape(b, s, kv, h // kv, d)
    scores = jnp.einsum("bskgd,btkd->bkgst", grouped, k).astype(jnp.float32) * (d ** -0.5)
    scores = jnp.where(mask[:, None, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgst,btkd->bskgd", probs, v).reshape(b, s, h, d)


def causal_blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, block: int) -> jax.Array:
    """`block` queries at a time over the keys up to the block's end only (query and key slots coincide).

    Every key after a block's last query is causally masked, so those blocks are skipped statically (with n blocks,
    n(n+1)/2 of the n^2 score blocks are computed). Each block is rematerialised, so [queries, keys] scores exist one
    block at a time in the forward and the backward pass.
    """
    seq_len = q.shape[1]
    if seq_len <= block:
        return einsum_attention(q, k, v, mask)
    attend = jax.checkpoint(einsum_attention)
    outputs = []
    for start in range(0, seq_len, block):  # the last block may be shorter
        end = min(start + block, seq_len)
        outputs.append(attend(q[:, start:end], k[:, :end], v[:, :end], mask[:, start:end, :end]))
    return jnp.concatenate(outputs, axis=1)


def live_blocks(mask: jax.Array, block: int) -> jax.Array:
    """[B, S/block, T/block] bool: whether a (query block, key block) tile has any unmasked entry."""
    b, s, t = mask.shape
    return mask.reshape(b, s // block, block, t // block, block).any(axis=(2, 4))


def block_sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, block: int) -> jax.Array:
    """Flash-style attention that computes only the tiles the mask leaves live, per row: causal, segment (packing)
    and key-padding tiles alike are skipped (lax.cond per tile), in the forward and the backward pass.

    Query and key slots coincide (no cache): S == T. The sequence is padded to a multiple of `block` with masked
    slots. Rows run one after another (lax.map), because which tiles are live differs per row; within a row the
    query blocks are unrolled and each walks the key blocks up to the diagonal with an online softmax. The backward
    pass (custom_vjp) recomputes each live tile's probabilities from the saved log-sum-exp, as FlashAttention-2 does,
    so no [S, T] tensor is ever stored.
    """
    b, s, h, d = q.shape
    # A query with no unmasked key (padding) gets what the dense kernel gives it, the mean of every value: the
    # reference's MoGE aux loss routes pad positions too, so their activations reach the loss.
    kv = k.shape[2]
    no_key = ~mask.any(axis=-1)
    mean_value = jnp.repeat(jnp.mean(v.astype(jnp.float32), axis=1), h // kv, axis=1).astype(q.dtype)  # [B, H, D]
    padded = -(-s // block) * block
    if padded != s:
        pad = ((0, 0), (0, padded - s), (0, 0), (0, 0))
        q, k, v = jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad)
        mask = jnp.pad(mask, ((0, 0), (0, padded - s), (0, padded - s)))
    live = live_blocks(mask, block)
    out = _block_sparse(q, k, v, mask, live, block)[:, :s]
    return jnp.where(no_key[:, :, None, None], mean_value[:, None], out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _block_sparse(q, k, v, mask, live, block):
    return _block_sparse_forward(q, k, v, mask, live, block)[0]


def _key_tile(q_tile, k, v, mask_rows, j, block):
    """Key block j of a row against one query block: (k_tile [bk, KV, D], v_tile, masked fp32 scores
    [KV, G, bq, bk]) for q_tile [bq, KV, G, D] and the query block's mask rows [bq, S]."""
    k_tile = jax.lax.dynamic_slice_in_dim(k, j * block, block)
    v_tile = jax.lax.dynamic_slice_in_dim(v, j * block, block)
    scores = jnp.einsum("skgd,tkd->kgst", q_tile, k_tile).astype(jnp.float32) * q_tile.shape[-1] ** -0.5
    mask_tile = jax.lax.dynamic_slice_in_dim(mask_rows, j * block, block, 1)
    return k_tile, v_tile, jnp.where(mask_tile[None, None], scores, _MASKED)


def _walk_live_tiles(update, init, live_row):
    """carry = update(carry, j) for the key blocks j of one query block whose tile is live (live_row[j]); the
    others cost a branch, not a tile."""
    def visit(carry, j):
        return jax.lax.cond(live_row[j], lambda c: update(c, j), lambda c: c, carry), None

    return jax.lax.scan(visit, init, jnp.arange(live_row.shape[0]))[0]


def _row_forward(q, k, v, mask, live, block):
    """One row: q [S, H, D], k/v [S, KV, D], mask [S, S], live [n, n] -> (out [S, H, D], lse [KV, G, S])."""
    s, h, d = q.shape
    kv = k.shape[1]
    groups, n = h // kv, s // block
    outs, lses = [], []
    for i in range(n):
        q_tile = q[i * block:(i + 1) * block].reshape(block, kv, groups, d)
        mask_rows = mask[i * block:(i + 1) * block]

        def update(carry, j, q_tile=q_tile, mask_rows=mask_rows):  # online softmax over the key blocks
            m, l, acc = carry
            _, v_tile, scores = _key_tile(q_tile, k, v, mask_rows, j, block)
            m_new = jnp.maximum(m, scores.max(axis=-1))
            probs = jnp.exp(scores - m_new[..., None])
            rescale = jnp.exp(m - m_new)
            acc = acc * rescale[..., None] + jnp.einsum("kgst,tkd->kgsd", probs.astype(v.dtype), v_tile)
            return m_new, l * rescale + probs.sum(axis=-1), acc

        init = (jnp.full((kv, groups, block), -jnp.inf, jnp.float32), jnp.zeros((kv, groups, block), jnp.float32),
                jnp.zeros((kv, groups, block, d), jnp.float32))
        m, l, acc = _walk_live_tiles(update, init, live[i, :i + 1])  # keys after the block are causally masked
        l = jnp.where(l == 0, 1.0, l)  # a tile row with no live block: output 0, not 0/0
        outs.append(jnp.transpose(acc / l[..., None], (2, 0, 1, 3)).reshape(block, h, d))
        lses.append(m + jnp.log(l))
    return jnp.concatenate(outs).astype(q.dtype), jnp.concatenate(lses, axis=-1)


def _block_sparse_forward(q, k, v, mask, live, block):
    out, lse = jax.lax.map(lambda row: _row_forward(*row, block), (q, k, v, mask, live))
    return out, (q, k, v, mask, live, out, lse)


def _row_backward(q, k, v, mask, live, out, lse, d_out, block):
    """FlashAttention-2's backward for one row, over the live tiles only."""
    s, h, d = q.shape
    kv = k.shape[1]
    groups, n, scale = h // kv, s // block, d ** -0.5
    # delta[k, g, s] = sum_d dO * O: the softmax-Jacobian term of every query row.
    delta = jnp.einsum("skgd,skgd->kgs", d_out.reshape(s, kv, groups, d).astype(jnp.float32),
                       out.reshape(s, kv, groups, d).astype(jnp.float32))
    d_k = jnp.zeros((s, kv, d), jnp.float32)
    d_v = jnp.zeros((s, kv, d), jnp.float32)
    d_qs = []
    for i in range(n):
        rows = slice(i * block, (i + 1) * block)
        q_tile = q[rows].reshape(block, kv, groups, d)
        do_tile = d_out[rows].reshape(block, kv, groups, d).astype(jnp.float32)

        def update(carry, j, q_tile=q_tile, do_tile=do_tile, lse_tile=lse[..., rows], delta_tile=delta[..., rows],
                   mask_rows=mask[rows]):
            d_q, d_k, d_v = carry
            k_tile, v_tile, scores = _key_tile(q_tile, k, v, mask_rows, j, block)
            probs = jnp.exp(scores - lse_tile[..., None])                       # [KV, G, bq, bk]
            d_probs = jnp.einsum("skgd,tkd->kgst", do_tile, v_tile.astype(jnp.float32))
            d_scores = probs * (d_probs - delta_tile[..., None]) * scale
            d_q = d_q + jnp.einsum("kgst,tkd->skgd", d_scores, k_tile.astype(jnp.float32))
            d_k = _add_at(d_k, jnp.einsum("kgst,skgd->tkd", d_scores, q_tile.astype(jnp.float32)), j * block)
            d_v = _add_at(d_v, jnp.einsum("kgst,skgd->tkd", probs, do_tile), j * block)
            return d_q, d_k, d_v

        d_q, d_k, d_v = _walk_live_tiles(update, (jnp.zeros((block, kv, groups, d), jnp.float32), d_k, d_v),
                                         live[i, :i + 1])
        d_qs.append(d_q.reshape(block, h, d))
    return jnp.concatenate(d_qs).astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype)


def _add_at(total, tile, start):
    """total[start:start + len(tile)] += tile (start traced)."""
    current = jax.lax.dynamic_slice_in_dim(total, start, tile.shape[0])
    return jax.lax.dynamic_update_slice_in_dim(total, current + tile, start, 0)


def _block_sparse_backward(block, residuals, d_out):
    q, k, v, mask, live, out, lse = residuals
    d_q, d_k, d_v = jax.lax.map(lambda row: _row_backward(*row, block), (q, k, v, mask, live, out, lse, d_out))
    return d_q, d_k, d_v, None, None


_block_sparse.defvjp(_block_sparse_forward, _block_sparse_backward)

"""The output head and the cross entropy as one differentiable step with a hand-written backward pass.

Autodiff of `logsumexp(float32(h @ W)) - picked` keeps, per chunk of positions, the fp32 logits, their shift by
the maximum and its exponential ([rows, chunk, vocab] each: the three largest temporaries of the 1B recipe's step
on v5p, 12 GiB). Here the forward keeps the logits in the compute dtype and reduces them to the log-sum-exp in
fp32 (the convert, shift and exponential fuse into the reductions), saving only h and the log-sum-exp; the backward
recomputes the logits and writes d logits = (softmax - one_hot(target)) x g in the compute dtype in one fused
pass, then forms dh and dW with two matmuls. The values are today's expression exactly; the gradients equal
autodiff's within fp32 rounding (softmax as exp(x - lse) instead of exp(x - max) / sum).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# [rows, positions, vocab] of the logits
LOGITS_AXES = ("activation_batch", "activation_length", "activation_vocab")


def _logits(h: jax.Array, w: jax.Array, vocab_major: bool, constrain) -> jax.Array:
    """h [B, C, d] x W ([d, V], or [V, d] when vocab_major: a tied embedding) in W's dtype."""
    spec = "bcd,vd->bcv" if vocab_major else "bcd,dv->bcv"
    return constrain(jnp.einsum(spec, h.astype(w.dtype), w), LOGITS_AXES)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def head_cross_entropy(h: jax.Array, w: jax.Array, targets: jax.Array, vocab_major: bool, constrain) -> jax.Array:
    """Per-position CE [B, C] (fp32) of the head W on h [B, C, d] against targets [B, C]."""
    return _forward(h, w, targets, vocab_major, constrain)[0]


def _forward(h, w, targets, vocab_major, constrain):
    # jax.nn.logsumexp's arithmetic, each reduction converting the compute-dtype logits itself: no fp32 copy of
    # the logits has several readers, so none is kept (XLA fuses the convert, shift and exp into the reductions)
    logits = _logits(h, w, vocab_major, constrain)
    top = jnp.max(logits, axis=-1).astype(jnp.float32)
    top = jax.lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))
    lse = jnp.log(jnp.sum(jnp.exp(logits.astype(jnp.float32) - top[..., None]), axis=-1)) + top
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0].astype(jnp.float32)
    return lse - picked, lse


def _fwd(h, w, targets, vocab_major, constrain):
    ce, lse = _forward(h, w, targets, vocab_major, constrain)
    return ce, (h, w, targets, lse)


def _bwd(vocab_major, constrain, residuals, g):
    h, w, targets, lse = residuals
    logits = _logits(h, w, vocab_major, constrain).astype(jnp.float32)
    vocab = jnp.arange(logits.shape[-1], dtype=targets.dtype)
    d_logits = (jnp.exp(logits - lse[..., None]) - (vocab == targets[..., None])) * g[..., None]
    d_logits = constrain(d_logits.astype(w.dtype), LOGITS_AXES)
    if vocab_major:
        dh = jnp.einsum("bcv,vd->bcd", d_logits, w)
        dw = jnp.einsum("bcv,bcd->vd", d_logits, h.astype(w.dtype))
    else:
        dh = jnp.einsum("bcv,dv->bcd", d_logits, w)
        dw = jnp.einsum("bcv,bcd->dv", d_logits, h.astype(w.dtype))
    return dh.astype(h.dtype), dw.astype(w.dtype), None


head_cross_entropy.defvjp(_fwd, _bwd)

"""LoRA adapters with GAL scaling, as separate modules whose output is added to the frozen layer's.

y = W x + s * B A dropout(x), with A ~ U(+-1/sqrt(fan_in)), B = 0 at init (docs/omnimol.md §2). With GAL the
scale is learnable through three fp32 scalars per adapter:

    s = clip(a, 15.9, 16.1) / r ** clip(p, 0.49, 0.51) + clip(b, -0.05, 0.05)

An adapter may be *stacked* over experts (leading axis E, logical axis `expert`); then each expert has its
own A, B, a, b, p, and optionally its own rank (per-expert ranks are stored padded to the largest rank;
only an expert's own columns are used, so the padding never contributes and receives zero gradient).

Adapter variables have their own types (`LoRAWeight`, `LoRAScale`), so that trainable and frozen parameters
split by type: see `omnimol_jax.train.recipes`.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from omnimol_jax.config import LoRAConfig
from omnimol_jax.model.dtypes import dtype_of


class LoRAWeight(nnx.Param):
    """A LoRA factor (A or B). Trainable in stage 2."""


class LoRAScale(nnx.Param):
    """A GAL scalar (a, b or p). Trainable in stage 2."""


class RouterWeight(nnx.Param):
    """MoGE router weights. Trainable in stage 2."""


def fold_rng(rng: Optional[jax.Array], *data: int) -> Optional[jax.Array]:
    """Derives a distinct dropout key per layer/adapter/expert slot; None stays None (deterministic)."""
    if rng is None:
        return None
    for d in data:
        rng = jax.random.fold_in(rng, d)
    return rng


def lora_scale(config: LoRAConfig, rank, gal_a=None, gal_b=None, gal_p=None, xp=jnp):
    """The adapter scale s (GAL's clipped learnable one, or alpha / r), with `xp` = jnp or numpy (host export)."""
    if not config.gal:
        return config.alpha / rank
    a = xp.clip(gal_a, *config.gal_a_range)
    p = xp.clip(gal_p, *config.gal_p_range)
    b = xp.clip(gal_b, *config.gal_b_range)
    return a / rank ** p + b


def dropout(x: jax.Array, rate: float, rng: Optional[jax.Array]) -> jax.Array:
    """Inverted dropout; identity when `rng` is None (evaluation) or the rate is 0."""
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class LoRA(nnx.Module):
    """Low-rank update of a projection with kernel shape in_shape + out_shape.

    Not stacked: `__call__(x)` returns s * B A dropout(x) with x [..., *in_shape].
    Stacked over E experts: `expert_apply(e, x)` applies expert e's adapter.
    """

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], in_axes: Sequence[str],
                 out_axes: Sequence[str], config: LoRAConfig, *, compute_dtype: jnp.dtype, rngs: nnx.Rngs,
                 num_experts: Optional[int] = None, expert_ranks: Optional[Sequence[int]] = None):
        self.config = config
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.compute_dtype = compute_dtype
        self.num_experts = num_experts
        self.ranks = tuple(expert_ranks) if expert_ranks is not None else None
        self.merged = False  # True while s*B*A is folded into the frozen kernel (see merge_lora)
        rank = max(self.ranks) if self.ranks else config.rank
        lead, lead_axes = ((num_experts,), ("expert",)) if num_experts else ((), ())
        param_dtype = dtype_of(config.param_dtype)
        bound = 1.0 / math.sqrt(math.prod(self.in_shape))
        a = jax.random.uniform(rngs.params(), lead + self.in_shape + (rank,), jnp.float32, -bound, bound)
        self.a = LoRAWeight(a.astype(param_dtype), logical_axes=lead_axes + tuple(in_axes) + ("lora_rank",))
        self.b = LoRAWeight(jnp.zeros(lead + (rank,) + self.out_shape, param_dtype),
                            logical_axes=lead_axes + ("lora_rank",) + tuple(out_axes))
        if config.gal:
            def scalar(value):
                return LoRAScale(jnp.full(lead, value, jnp.float32), logical_axes=lead_axes)
            self.gal_a, self.gal_b, self.gal_p = (scalar(config.gal_a_init), scalar(config.gal_b_init),
                                                  scalar(config.gal_p_init))

    # -- scaling

    def _rank_vector(self) -> jax.Array:
        if self.ranks is not None:
            return jnp.asarray(self.ranks, jnp.float32)
        shape = (self.num_experts,) if self.num_experts else ()
        return jnp.full(shape, float(self.config.rank), jnp.float32)

    def scale(self) -> jax.Array:
        """s per adapter: a scalar, or [E] when stacked. fp32."""
        if not self.config.gal:
            return lora_scale(self.config, self._rank_vector())
        return lora_scale(self.config, self._rank_vector(), self.gal_a[...], self.gal_b[...], self.gal_p[...])

    def rank_mask(self) -> Optional[jax.Array]:
        """[E, r_max] 1/0 mask of each expert's own rank, or None when all ranks are equal."""
        if self.ranks is None or len(set(self.ranks)) == 1:
            return None
        return jnp.asarray(np.arange(max(self.ranks))[None, :] < np.asarray(self.ranks)[:, None], jnp.float32)

    # -- weights as used in compute

    def factors(self) -> tuple[jax.Array, jax.Array]:
        return self.a[...].astype(self.compute_dtype), self.b[...].astype(self.compute_dtype)

    def delta_weight(self) -> jax.Array:
        """s * A @ B in kernel layout (in_shape + out_shape; [E, ...] when stacked), fp32."""
        a, b = self.a[...].astype(jnp.float32), self.b[...].astype(jnp.float32)
        mask = self.rank_mask()
        if mask is not None:
            a = a * mask.reshape((mask.shape[0],) + (1,) * len(self.in_shape) + (mask.shape[1],))
        if self.num_experts:
            a2 = a.reshape(self.num_experts, -1, a.shape[-1])
            b2 = b.reshape(self.num_experts, b.shape[1], -1)
            delta = jnp.einsum("eir,ero->eio", a2, b2) * self.scale()[:, None, None]
            return delta.reshape((self.num_experts,) + self.in_shape + self.out_shape)
        return jnp.tensordot(a, b, axes=1) * self.scale()

    # -- application

    def __call__(self, x: jax.Array, rng: Optional[jax.Array] = None) -> jax.Array:
        if self.num_experts:
            raise ValueError("a stacked (per-expert) adapter is applied with expert_apply")
        a, b = self.factors()
        x = dropout(x.astype(self.compute_dtype), self.config.dropout, rng)
        low = jnp.tensordot(x, a, axes=len(self.in_shape))
        return (jnp.tensordot(low, b, axes=1) * self.scale().astype(self.compute_dtype))

    def expert_apply(self, expert: int, x: jax.Array, rng: Optional[jax.Array] = None) -> jax.Array:
        """s_e * B_e A_e dropout_e(x) for one expert of a stacked adapter; x [N, *in_shape] -> [N, *out_shape].

        Each expert has its own dropout mask (as each expert module has its own dropout in the reference);
        with per-expert ranks only the expert's own rank columns are used.
        """
        a, b = self.factors()
        rank = self.ranks[expert] if self.ranks is not None else a.shape[-1]
        a_e = a[expert].reshape(-1, a.shape[-1])[:, :rank]
        b_e = b[expert][:rank].reshape(rank, -1)
        x = dropout(x.astype(self.compute_dtype), self.config.dropout, fold_rng(rng, expert))
        flat = x.reshape(x.shape[0], -1)
        out = (flat @ a_e) @ b_e * self.scale()[expert].astype(self.compute_dtype)
        return out.reshape((x.shape[0],) + self.out_shape)


    # -- stacked (all experts at once, in the rank-r space): the `stacked` MoGE formulation

    def stacked_low_rank(self, x: jax.Array, rng: Optional[jax.Array] = None) -> jax.Array:
        """[N, E, r]: s_e * dropout_e(x) A_e for every expert e of a stacked adapter, x [N, *in_shape].

        Each expert's dropout mask is the one expert_apply(e, ...) draws (same key, same shape), so the two
        formulations agree under dropout too. Columns past an expert's own rank are zeroed here, so they never
        contribute and get no gradient.
        """
        a, _ = self.factors()
        experts, rank = self.num_experts, a.shape[-1]
        a = a.reshape(experts, -1, rank)
        x = x.astype(self.compute_dtype)
        if rng is None or self.config.dropout == 0.0:
            low = jnp.einsum("ni,eir->ner", x.reshape(x.shape[0], -1), a)
        else:  # one mask per expert: [E, N, in] inputs (training with dropout only)
            dropped = jnp.stack([dropout(x, self.config.dropout, fold_rng(rng, e)).reshape(x.shape[0], -1)
                                 for e in range(experts)])
            low = jnp.einsum("eni,eir->ner", dropped, a)
        factor = self.scale()[:, None]
        mask = self.rank_mask()
        if mask is not None:
            factor = factor * mask
        return low * factor.astype(self.compute_dtype)[None]

    def stacked_expand(self, low: jax.Array) -> jax.Array:
        """sum_e low[:, e] B_e: [N, E, r] -> [N, *out_shape], one contraction over (expert, rank)."""
        _, b = self.factors()
        out = jnp.einsum("ner,ero->no", low, b.reshape(self.num_experts, b.shape[1], -1))
        return out.reshape((low.shape[0],) + self.out_shape)


def _plain_adapters(module: nnx.Module):
    """(frozen projection, its adapter) pairs; MoGE expert adapters are excluded (they share one W)."""
    for _, owner in nnx.iter_modules(module):
        for name, value in list(vars(owner).items()):
            if name.endswith("_lora") and isinstance(value, LoRA) and value.num_experts is None:
                base = getattr(owner, name[: -len("_lora")], None)
                if base is not None:
                    yield base, value


def merge_lora(module: nnx.Module) -> int:
    """Folds every plain adapter into its frozen kernel (W += s B A) for export or fast inference.

    The adapter stays (marked merged, skipped in forward), so `unmerge_lora` can restore training. Returns
    the number of adapters merged.
    """
    count = 0
    for base, adapter in _plain_adapters(module):
        if not adapter.merged:
            kernel = base.kernel[...]
            base.kernel.set_value((kernel.astype(jnp.float32) + adapter.delta_weight()).astype(kernel.dtype))
            adapter.merged = True
            count += 1
    return count


def unmerge_lora(module: nnx.Module) -> int:
    """Inverse of merge_lora (W -= s B A); exact up to floating-point rounding of the kernel dtype."""
    count = 0
    for base, adapter in _plain_adapters(module):
        if adapter.merged:
            kernel = base.kernel[...]
            base.kernel.set_value((kernel.astype(jnp.float32) - adapter.delta_weight()).astype(kernel.dtype))
            adapter.merged = False
            count += 1
    return count

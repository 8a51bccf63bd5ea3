"""MoGE: a mixture of GAL-LoRA experts replacing the FFN of selected decoder layers (docs/omnimol.md §3).

Every expert is the layer's frozen SwiGLU FFN plus its own LoRA on gate, up and down:
    E_e(h) = down'_e(silu(gate'_e(h)) * up'_e(h)),   proj'_e = W_proj + s_e B_e A_e
and the layer computes y(h) = sum_{j in topk(h)} w_j E_j(h) + E_shared(h) with an fp32 softmax router.

Three implementations, selected by `moge.implementation`, give the same numbers:
- `naive`: each selected expert evaluates its full FFN (the reference's structure: k + 1 FFNs per token).
- `fused`: the experts share W, so W_gate h and W_up h are computed once per token, and by linearity
  sum_j w_j W_down z_j = W_down (sum_j w_j z_j): one down projection. Only the LoRA parts and the
  elementwise silu-product are per expert (about 1 FFN per token).
- `stacked`: `fused`'s frozen work, with the LoRA work kept in the rank-r space: x A_e for all experts at once,
  masked per slot, one contraction with the stacked B; no [tokens, ffn] tensor per expert.
Experts are evaluated densely (every expert's LoRA on every token, masked by the routing): no sort or
dynamic shapes, and it shards over the expert axis. `jax.lax.ragged_dot` would compute only routed
tokens, but XLA:CPU lowers it densely and slower (measured), so it is not used here.
The frozen kernels keep the plain MLP's names (gate_proj/up_proj/down_proj), so HF conversion is unchanged.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from omnimol_jax.config import ModelConfig
from omnimol_jax.model.lora import LoRA, RouterWeight, dropout, fold_rng
from omnimol_jax.sharding import constrain

TOKENS_EMBED = ("activation_batch", "activation_embed")
TOKENS_MLP = ("activation_batch", "activation_mlp")


class MoGEFeedForward(nnx.Module):
    def __init__(self, config: ModelConfig, projection_cls, projection_kwargs: dict[str, Any], *, rngs: nnx.Rngs):
        moge, lora = config.moge, config.lora
        d, f, num_experts = config.hidden_size, config.intermediate_size, moge.num_experts
        self.config = config
        self.gate_proj = projection_cls((d,), (f,), ("embed", "mlp"), **projection_kwargs, rngs=rngs)
        self.up_proj = projection_cls((d,), (f,), ("embed", "mlp"), **projection_kwargs, rngs=rngs)
        self.down_proj = projection_cls((f,), (d,), ("mlp", "embed"), **projection_kwargs, rngs=rngs)
        # Router [E, d] as in the reference (kaiming-uniform, a=sqrt(5) -> U(+-1/sqrt(d))), fp32, replicated.
        bound = 1.0 / d ** 0.5
        self.router = RouterWeight(jax.random.uniform(rngs.params(), (num_experts, d), jnp.float32, -bound, bound),
                                   logical_axes=(None, None))
        compute_dtype = projection_kwargs["dtype"]
        expert_kw = dict(config=lora, compute_dtype=compute_dtype, rngs=rngs, num_experts=num_experts,
                         expert_ranks=moge.expert_ranks)
        self.expert_gate_lora = LoRA((d,), (f,), ("embed",), ("mlp",), **expert_kw)
        self.expert_up_lora = LoRA((d,), (f,), ("embed",), ("mlp",), **expert_kw)
        self.expert_down_lora = LoRA((f,), (d,), ("mlp",), ("embed",), **expert_kw)
        if moge.num_shared_experts:
            shared_kw = dict(config=lora, compute_dtype=compute_dtype, rngs=rngs)
            self.shared_gate_lora = LoRA((d,), (f,), ("embed",), ("mlp",), **shared_kw)
            self.shared_up_lora = LoRA((d,), (f,), ("embed",), ("mlp",), **shared_kw)
            self.shared_down_lora = LoRA((f,), (d,), ("mlp",), ("embed",), **shared_kw)

    # ------------------------------------------------------------------------------------------------

    def route(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(probs [N, E] fp32, top-k weights [N, k] fp32, top-k expert ids [N, k])."""
        moge = self.config.moge
        logits = jnp.einsum("nd,ed->ne", x.astype(jnp.float32), self.router[...])
        probs = jax.nn.softmax(logits, axis=-1)
        weights, experts = jax.lax.top_k(probs, moge.top_k)
        if moge.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
        return probs, weights * moge.routed_scaling_factor, experts

    def aux_loss(self, probs: jax.Array, experts: jax.Array, token_weight: jax.Array) -> jax.Array:
        """alpha * sum_i f_i P_i, f_i = E/(N k) * #assignments to i, P_i = mean_n p_{n,i} (1.0 if balanced)."""
        moge = self.config.moge
        num_tokens = jnp.maximum(token_weight.sum(), 1.0)
        one_hot = jax.nn.one_hot(experts, moge.num_experts, dtype=jnp.float32)
        counts = (one_hot * token_weight[:, None, None]).sum((0, 1))
        load = moge.num_experts / (num_tokens * moge.top_k) * counts
        mean_prob = (probs * token_weight[:, None]).sum(0) / num_tokens
        loss = moge.aux_loss_alpha * jnp.sum(load * mean_prob)
        return jax.lax.stop_gradient(loss) if moge.aux_loss_stop_gradient else loss

    def __call__(self, h: jax.Array, token_mask: jax.Array, rng: Optional[jax.Array] = None
                 ) -> tuple[jax.Array, dict]:
        moge = self.config.moge
        batch_shape = h.shape[:-1]
        x = constrain(h.reshape(-1, h.shape[-1]), TOKENS_EMBED)
        real = token_mask.reshape(-1).astype(jnp.float32)

        probs, weights, experts = self.route(x)
        selection = jax.nn.one_hot(experts, moge.num_experts, dtype=jnp.float32)  # [N, k, E]
        implementation = {"stacked": self._stacked, "fused": self._fused, "naive": self._naive}
        y = implementation[moge.implementation](x, weights, selection, rng)

        aux_weight = real if moge.aux_loss_ignore_padding else jnp.ones_like(real)
        aux = {"aux_loss": self.aux_loss(probs, experts, aux_weight)}
        aux.update(self._router_stats(weights, selection, real))
        return y.reshape(batch_shape + (y.shape[-1],)), aux

    # ------------------------------------------------------------------------------------------------

    def _shared_rngs(self, rng):
        return fold_rng(rng, 100), fold_rng(rng, 101), fold_rng(rng, 102)

    def _expert_rngs(self, rng):
        return fold_rng(rng, 0), fold_rng(rng, 1), fold_rng(rng, 2)

    def _down_dropout(self, z, slot, rng):
        """The routed experts' down-LoRA input, dropped out with one mask per top-k slot. A token's chosen experts
        sit in distinct slots, so each (token, expert) still gets its own independent mask, as with one dropout
        module per expert, but no [tokens, ffn] tensor is needed per expert."""
        compute_dtype = self.expert_down_lora.compute_dtype
        return dropout(z.astype(compute_dtype), self.config.lora.dropout, fold_rng(rng, slot))

    def _add_shared_and_project(self, x, gate_base, up_base, combined, down_lora, rng):
        """The shared expert (its LoRA on the frozen gate/up computed once per token) joins the routed weighted sum,
        and one frozen down projection of the whole sum finishes the layer (fused and stacked)."""
        if self.config.moge.num_shared_experts:
            rng_gate, rng_up, rng_down = self._shared_rngs(rng)
            z = (jax.nn.silu(gate_base + self.shared_gate_lora(x, rng_gate))
                 * (up_base + self.shared_up_lora(x, rng_up)))
            combined = combined + z
            down_lora = down_lora + self.shared_down_lora(z, rng_down)
        return self.down_proj(constrain(combined, TOKENS_MLP)) + down_lora

    def _stacked(self, x, weights, selection, rng):
        """Like `fused` (frozen gate/up once per token, one frozen down projection of the weighted sum), but the
        per-expert work stays in the rank-r space: every expert's x A_e at once ([N, E, r]), masked per slot by
        the routing, then one contraction with the stacked B over (expert, rank). No [N, ffn] tensor per expert
        is ever formed, so the traffic scales with the k slots, not with the E experts."""
        moge = self.config.moge
        rng_gate, rng_up, rng_down = self._expert_rngs(rng)
        gate_base = constrain(self.gate_proj(x), TOKENS_MLP)
        up_base = constrain(self.up_proj(x), TOKENS_MLP)
        gate_low = self.expert_gate_lora.stacked_low_rank(x, rng_gate)  # [N, E, r]
        up_low = self.expert_up_lora.stacked_low_rank(x, rng_up)
        combined, down_low = 0.0, 0.0
        for slot in range(moge.top_k):
            chosen = selection[:, slot, :, None].astype(gate_low.dtype)  # [N, E, 1]: this slot's expert
            gate = gate_base + constrain(self.expert_gate_lora.stacked_expand(gate_low * chosen), TOKENS_MLP)
            up = up_base + constrain(self.expert_up_lora.stacked_expand(up_low * chosen), TOKENS_MLP)
            z = jax.nn.silu(gate) * up
            weight = weights[:, slot:slot + 1]
            combined = combined + weight.astype(z.dtype) * z
            # expert e's down input is sum over slots of [chose e] w z; its low-rank image is linear in it
            routed = (selection[:, slot, :, None] * weight[:, :, None]).astype(z.dtype)
            down_low = down_low + routed * self.expert_down_lora.stacked_low_rank(
                self._down_dropout(z, slot, rng_down))
        down_lora = self.expert_down_lora.stacked_expand(down_low)
        return self._add_shared_and_project(x, gate_base, up_base, combined, down_lora, rng)

    def _fused(self, x, weights, selection, rng):
        """Loops over experts, not slots: each expert's low-rank products are computed once for all tokens and
        shared by the k slots; the frozen FFN costs one gate, one up and one down projection per token."""
        moge = self.config.moge
        rng_gate, rng_up, rng_down = self._expert_rngs(rng)
        gate_base = constrain(self.gate_proj(x), TOKENS_MLP)  # once per token, shared by every expert
        up_base = constrain(self.up_proj(x), TOKENS_MLP)
        gates = [gate_base] * moge.top_k
        ups = [up_base] * moge.top_k
        for e in range(moge.num_experts):
            gate_delta = self.expert_gate_lora.expert_apply(e, x, rng_gate)
            up_delta = self.expert_up_lora.expert_apply(e, x, rng_up)
            for slot in range(moge.top_k):
                chosen = selection[:, slot, e:e + 1].astype(gate_delta.dtype)
                gates[slot] = gates[slot] + chosen * gate_delta
                ups[slot] = ups[slot] + chosen * up_delta
        products = [jax.nn.silu(g) * u for g, u in zip(gates, ups)]
        combined = sum(weights[:, slot:slot + 1].astype(z.dtype) * z for slot, z in enumerate(products))
        dropped = [self._down_dropout(z, slot, rng_down) for slot, z in enumerate(products)]
        down_lora = 0.0
        for e in range(moge.num_experts):
            # the slot (if any) in which each token chose expert e, weighted: expert e's down input
            routed = sum((selection[:, slot, e:e + 1] * weights[:, slot:slot + 1]).astype(z.dtype) * z
                         for slot, z in enumerate(dropped))
            down_lora = down_lora + self.expert_down_lora.expert_apply(e, routed)
        return self._add_shared_and_project(x, gate_base, up_base, combined, down_lora, rng)

    def _naive(self, x, weights, selection, rng):
        """The reference's structure: every selected expert runs its own full FFN (W + its LoRA)."""
        moge = self.config.moge
        rng_gate, rng_up, rng_down = self._expert_rngs(rng)

        def expert_delta(adapter, slot, inputs, key):
            return sum(selection[:, slot, e:e + 1].astype(inputs.dtype) * adapter.expert_apply(e, inputs, key)
                       for e in range(moge.num_experts))

        def own_copy(tag):
            # x + 0*tag == x exactly (finite tags), but XLA cannot fold it, so each expert really evaluates its
            # own FFN instead of CSE sharing W x between experts (optimization_barrier is dropped before CSE on
            # CPU/GPU). Distinct tags keep the copies distinct.
            return x + jnp.zeros((), x.dtype) * tag.astype(x.dtype)

        y = jnp.zeros_like(x)
        for slot in range(moge.top_k):
            xs = own_copy(weights[:, slot:slot + 1])
            z = (jax.nn.silu(self.gate_proj(xs) + expert_delta(self.expert_gate_lora, slot, xs, rng_gate))
                 * (self.up_proj(xs) + expert_delta(self.expert_up_lora, slot, xs, rng_up)))
            out = self.down_proj(z) + expert_delta(self.expert_down_lora, slot, self._down_dropout(z, slot, rng_down),
                                                   None)
            y = y + weights[:, slot:slot + 1].astype(out.dtype) * out
        if moge.num_shared_experts:
            rng_gate, rng_up, rng_down = self._shared_rngs(rng)
            xs = own_copy(selection[:, 0, :1])
            z = (jax.nn.silu(self.gate_proj(xs) + self.shared_gate_lora(xs, rng_gate))
                 * (self.up_proj(xs) + self.shared_up_lora(xs, rng_up)))
            y = y + self.down_proj(z) + self.shared_down_lora(z, rng_down)
        return y

    def _router_stats(self, weights, selection, real) -> dict:
        """Router telemetry (no gradient): expert load (share of real-token assignments), mean top-k weight, and
        each token's assignments [N, E] (what per-task statistics are made of, outside the model)."""
        moge = self.config.moge
        per_token = jax.lax.stop_gradient(selection.sum(1) * real[:, None])  # [N, E] assignments
        total = jnp.maximum(per_token.sum(), 1.0)
        return {"router_load": per_token.sum(0) / total,
                "router_topk_weight": jax.lax.stop_gradient((weights * real[:, None]).sum()
                                                            / jnp.maximum(real.sum() * moge.top_k, 1.0)),
                "router_assignments": per_token}

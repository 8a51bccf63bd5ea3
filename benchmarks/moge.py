"""MoGE cost of the three formulations (stacked, fused, naive): XLA's FLOPs, bytes and temporaries, and time.

    python benchmarks/moge.py [--tokens 8192] [--batch 4 --seq 256 --iters 5] [--topology v5p-8 --skip-step]
Part 1 compiles ONE MoE layer at the llama3_2_1b shapes (d=2048, f=8192, E=5 + 1 shared, k=2, r=64, bf16) for
this machine's backend on abstract inputs (nothing allocated) and reads, per formulation, FLOPs and bytes
accessed per token and the temporary bytes of the forward and of forward+backward w.r.t. the trainables. Part 2
times a full train-style step (loss + gradients of the trainables) of the `small` preset with MoGE, the
formulations interleaved round by round (min and median). Prints one JSON object.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from machine import describe_machine  # benchmarks/machine.py (the script folder is on sys.path)

from omnimol_jax.config import LoRAConfig, MoGEConfig, model_config_from_preset
from omnimol_jax.model.dtypes import dtype_of
from omnimol_jax.model.llama import LlamaForCausalLM, Projection, count_parameters
from omnimol_jax.model.lora import LoRAScale, LoRAWeight, RouterWeight
from omnimol_jax.model.moge import MoGEFeedForward
from omnimol_jax.train.flops import compiled_flops
from omnimol_jax.train.recipes import split_trainable

TRAINABLE = nnx.Any(LoRAWeight, LoRAScale, RouterWeight)
IMPLEMENTATIONS = ("stacked", "fused", "naive")


def cost(compiled, tokens: int) -> dict:
    analysis = compiled.cost_analysis()
    analysis = (analysis[0] if isinstance(analysis, (list, tuple)) and analysis else analysis) or {}
    memory = compiled.memory_analysis()
    return {"flops_per_token": compiled_flops(compiled) / tokens,
            "bytes_accessed_per_token": float(analysis.get("bytes accessed", 0.0)) / tokens,
            "temp_bytes": int(getattr(memory, "temp_size_in_bytes", 0))}


def with_impl(config, implementation):
    return dataclasses.replace(config, moge=dataclasses.replace(config.moge, implementation=implementation))


def layer_costs(config, tokens: int, device=None) -> dict:
    """Compiled costs of one MoE layer per formulation, for this host's backend or for `device` (e.g. one chip of a
    TPU topology from `omnimol_jax.aot.topology.resolve`)."""
    result = {}
    sharding = jax.sharding.SingleDeviceSharding(device) if device is not None else None

    def placed(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    for impl in IMPLEMENTATIONS:
        cfg = with_impl(config, impl)
        kw = dict(dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype), init_std=0.02)
        abstract = nnx.eval_shape(lambda: MoGEFeedForward(cfg, Projection, kw, rngs=nnx.Rngs(0)))
        graphdef, trainable, frozen = nnx.split(abstract, TRAINABLE, ...)
        trainable, frozen = jax.tree.map(placed, trainable), jax.tree.map(placed, frozen)
        h = placed(jax.ShapeDtypeStruct((1, tokens, cfg.hidden_size), dtype_of(cfg.dtype)))
        mask = placed(jax.ShapeDtypeStruct((1, tokens), jnp.bool_))

        def forward(tr, fr, h, mask):
            y, aux = nnx.merge(graphdef, tr, fr)(h, mask)
            return y, aux["aux_loss"]

        def loss(tr, fr, h, mask, dropout_rng=None):
            y, aux = nnx.merge(graphdef, tr, fr)(h, mask, dropout_rng)
            return jnp.sum(y.astype(jnp.float32) ** 2) + 0.01 * aux["aux_loss"]

        fwd = jax.jit(forward).lower(trainable, frozen, h, mask).compile()
        bwd = jax.jit(jax.grad(loss)).lower(trainable, frozen, h, mask).compile()
        # LoRA dropout on (the recipe's 0.05): each expert's gate/up input gets its own mask
        dropped = jax.jit(jax.grad(lambda *a: loss(*a, jax.random.key(0)))).lower(trainable, frozen, h,
                                                                                   mask).compile()
        result[impl] = {"forward": cost(fwd, tokens), "train": cost(bwd, tokens),
                        "train_with_dropout": cost(dropped, tokens)}
        if impl == "fused":
            sizes = {"frozen": frozen, "trainable": trainable}
            result["param_bytes"] = {k: int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(v)))
                                     for k, v in sizes.items()}
    d, f, e = config.hidden_size, config.intermediate_size, config.moge.num_experts + config.moge.num_shared_experts
    frozen_ffn_bytes = 3 * d * f * np.dtype(jnp.bfloat16).itemsize
    result["param_bytes"]["reference_frozen_copies"] = int(e * frozen_ffn_bytes)  # a deep copy per expert
    result["dense_ffn_flops_per_token"] = 2 * 3 * d * f
    return result


def step_times(config, batch: int, seq: int, iters: int) -> dict:
    ids = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (batch, seq + 1)), jnp.int32)
    out, runs = {}, {}
    for impl in IMPLEMENTATIONS:
        model = LlamaForCausalLM(with_impl(config, impl), rngs=nnx.Rngs(0))
        graphdef, trainable, frozen = split_trainable(model)[:3]

        def loss(tr, fr, ids):
            o = nnx.merge(graphdef, tr, fr)(ids[:, :-1])
            ce = optax.softmax_cross_entropy_with_integer_labels(o.logits.astype(jnp.float32), ids[:, 1:]).mean()
            return ce + config.moge.aux_loss_coef * o.aux["aux_loss"].sum()

        step = jax.jit(jax.value_and_grad(loss))
        start = time.perf_counter()
        compiled = step.lower(trainable, frozen, ids).compile()
        compile_s = time.perf_counter() - start
        value, _ = compiled(trainable, frozen, ids)
        runs[impl] = (compiled, trainable, frozen, [])
        out[impl] = {"compile_s": round(compile_s, 2), "loss": float(value),
                     "train_flops_per_token": compiled_flops(compiled) / (batch * seq)}
    for _ in range(iters):  # interleaved: every round times each formulation once
        for impl, (compiled, trainable, frozen, times) in runs.items():
            start = time.perf_counter()
            jax.block_until_ready(compiled(trainable, frozen, ids))
            times.append(time.perf_counter() - start)
    for impl, (_, _, _, times) in runs.items():
        out[impl].update(step_s_min=round(min(times), 4), step_s_median=round(statistics.median(times), 4),
                         tokens_per_s=round(batch * seq / statistics.median(times), 1))
    for impl in IMPLEMENTATIONS[:2]:
        out[f"{impl}_loss_abs_diff_vs_naive"] = abs(out[impl]["loss"] - out["naive"]["loss"])
        out[f"{impl}_over_naive_time_median"] = round(out[impl]["step_s_median"] / out["naive"]["step_s_median"], 3)
    out["stacked_over_fused_time_median"] = round(out["stacked"]["step_s_median"] / out["fused"]["step_s_median"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192, help="tokens in the abstract llama3_2_1b layer batch")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--skip-step", action="store_true", help="only the compiled costs at 1B shapes")
    parser.add_argument("--topology", default=None,
                        help="compile the 1B layer for one chip of this TPU topology (e.g. v5p-8; needs libtpu)")
    args = parser.parse_args()

    moge_1b = dataclasses.replace(model_config_from_preset("llama3_2_1b"), lora=LoRAConfig(enabled=True, dropout=0.05),
                                  moge=MoGEConfig(enabled=True))
    device = target = None
    if args.topology:
        from omnimol_jax.aot.topology import resolve

        target = resolve(args.topology)
        device = target.devices[0]
    layer = layer_costs(moge_1b, args.tokens, device)
    if target is not None:  # the roofline of forward + backward: the slower of compute at peak and bytes at full HBM
        for impl in IMPLEMENTATIONS:
            train = layer[impl]["train"]
            layer[impl]["train_roofline_ns_per_token"] = round(1e9 * max(
                train["flops_per_token"] / target.peak_flops,
                train["bytes_accessed_per_token"] / target.hbm_bandwidth), 3)
    ratios = {}
    for impl in IMPLEMENTATIONS[:2]:
        for peer in IMPLEMENTATIONS[1:]:
            if impl == peer:
                continue
            ratios[f"{impl}_over_{peer}"] = {
                f"{part}_{key}": round(layer[impl][part][key] / max(layer[peer][part][key], 1), 3)
                for part in ("forward", "train", "train_with_dropout")
                for key in ("flops_per_token", "bytes_accessed_per_token", "temp_bytes")}
    result = {
        "benchmark": "moge", "backend": args.topology or jax.default_backend(),
        "llama3_2_1b_moge_parameters": count_parameters(moge_1b),
        "reference_parameters_approx": 2.2e9,
        "one_moe_layer_llama3_2_1b": {"tokens": args.tokens, **layer},
        "ratios": ratios,
    }
    if not args.skip_step:
        small = dataclasses.replace(model_config_from_preset("small"), lora=LoRAConfig(enabled=True, dropout=0.0),
                                    moge=MoGEConfig(enabled=True))
        result["small_moge_train_step"] = {"preset": "small", "batch": args.batch, "seq_len": args.seq,
                                           **step_times(small, args.batch, args.seq, args.iters)}
    result["machine"] = describe_machine()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

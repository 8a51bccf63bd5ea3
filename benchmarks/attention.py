"""Attention kernels on the packed rows a run really trains on, and the whole train step with each.

    python benchmarks/attention.py [--config configs/demo.yaml] [--blocks 32,64,128] [--iters 7] [key=value ...]

Batches come from the run's own pipeline (configs' data section: packing, mixture, seq_len), so the masks hold the
real layout of samples per row. Part one times forward + backward (jax.grad of sum(sin(out)) w.r.t. q, k, v) of each
kernel in omnimol_jax/model/attention.py at the model's shapes (rows, seq_len, heads, head_dim): dense einsum, the
causal blockwise kernel and the block-sparse kernel at each --blocks size, with the share of score tiles each one
computes, and checks that every kernel's output equals the dense one at real queries. Part two times the trainer's
whole step (loss, gradients, clipping, AdamW; the config's model and recipe) with model.attention_impl=einsum,
blockwise and block_sparse at each block size, and compares their losses. Part three times the generation prefill
(`prefill` below). All contenders are timed interleaved in one process (benchmarks/machine.py); min and median are
printed in one JSON object.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from machine import describe_machine, interleaved, pin_threads  # benchmarks/machine.py (the script folder)

from omnimol_jax.config import load_config
from omnimol_jax.data.loader import place_micro_batches
from omnimol_jax.data.pipeline import Pipeline
from omnimol_jax.model import attention
from omnimol_jax.model.build import omnimol_constructor
from omnimol_jax.sharding import build_mesh, use_mesh
from omnimol_jax.train.program import run_train_program


def packed_masks(segment_ids: np.ndarray) -> np.ndarray:
    """The model's training mask [B, S, S]: causal, real keys, same segment (LlamaForCausalLM + Attention)."""
    slots = np.arange(segment_ids.shape[1])
    causal = slots[None, :] <= slots[:, None]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return causal[None] & same & (segment_ids > 0)[:, None, :]


def summary(times: list[float]) -> dict:
    return {"min_s": round(min(times), 4), "median_s": round(statistics.median(times), 4)}


def prefill(model_config, args, blocks: list[int]) -> dict:
    """The generation prefill (decoding.forward_last into an empty cache of prompt + new-token slots) of left-padded
    prompts: over every cache slot with the einsum kernel (what it did before fresh_cache), and over the prompt's own
    keys (fresh_cache) with blockwise and block_sparse. Logits of the last position must agree."""
    from omnimol_jax.inference.decoding import forward_last
    from omnimol_jax.model.kv_cache import init_kv_cache
    from omnimol_jax.model.llama import LlamaForCausalLM

    rows, length, slots = args.prefill_rows, args.prefill_len, args.prefill_len + args.prefill_new
    rng = np.random.default_rng(1)
    real = rng.integers(length // 3, length + 1, rows)  # prompt lengths of a bucket, left-padded
    attention_mask = jnp.asarray(np.arange(length)[None] >= (length - real)[:, None], jnp.int32)
    ids = jnp.asarray(rng.integers(3, model_config.vocab_size, (rows, length)), jnp.int32)
    variants = {"every_slot_einsum": ("einsum", model_config.attention_block, False),
                f"fresh_blockwise_{model_config.attention_block}": ("blockwise", model_config.attention_block, True)}
    variants.update({f"fresh_block_sparse_{b}": ("block_sparse", b, True) for b in blocks})
    runs, logits = {}, {}
    for name, (impl, block, fresh) in variants.items():
        model = LlamaForCausalLM(dataclasses.replace(model_config, attention_impl=impl, attention_block=block),
                                 rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        run = jax.jit(lambda s, i, m, g=graphdef, f=fresh: forward_last(
            nnx.merge(g, s), i, m, init_kv_cache(model_config, rows, slots), None, fresh_cache=f)[0])
        logits[name] = np.asarray(run(state, ids, attention_mask))
        runs[name] = lambda run=run, state=state: run(state, ids, attention_mask)
    times = interleaved(runs, args.iters)
    base = statistics.median(times["every_slot_einsum"])
    share = round(float(real.mean() / length), 3)
    return {"rows": rows, "prompt_len": length, "cache_slots": slots, "real_token_share": share,
            **{name: {**summary(t), "speedup_vs_every_slot_median": round(base / statistics.median(t), 3),
                      "max_abs_logit_diff": float(np.abs(logits[name] - logits["every_slot_einsum"]).max())}
               for name, t in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--blocks", default="32,64,128", help="block sizes for block_sparse")
    parser.add_argument("--iters", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="pin to this many cores (0: all)")
    parser.add_argument("--no-step", action="store_true", help="kernels only, not the whole train step")
    parser.add_argument("--prefill-rows", type=int, default=32, help="prefill batch (0: skip the prefill part)")
    parser.add_argument("--prefill-len", type=int, default=256, help="prompt bucket length")
    parser.add_argument("--prefill-new", type=int, default=512, help="new-token slots in the cache")
    parser.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = parser.parse_args()
    pinned = pin_threads(args.threads)
    config = load_config(args.config, args.overrides)
    blocks = [int(b) for b in args.blocks.split(",")]
    model_config = config.model

    pipeline = Pipeline(config.data, feature_mode=config.graph.feature_mode)
    iterator = pipeline.iterator()
    host_batches = [next(iterator) for _ in range(config.train.grad_accum_steps)]
    iterator.close()
    segment_ids = np.asarray(host_batches[0]["segment_ids"])
    mask = packed_masks(segment_ids)
    rows, seq = segment_ids.shape
    rng = np.random.default_rng(0)
    shape = (rows, seq)
    q = jnp.asarray(rng.normal(size=shape + (model_config.num_heads, model_config.head_dim)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=shape + (model_config.num_kv_heads, model_config.head_dim)), jnp.float32)
            for _ in range(2))
    real_queries = mask.any(axis=-1)

    kernels = {"einsum": attention.einsum_attention,
               f"blockwise_{model_config.attention_block}":
                   lambda q, k, v, m: attention.causal_blockwise_attention(q, k, v, m, model_config.attention_block)}
    tiles = {"einsum": 1.0, f"blockwise_{model_config.attention_block}": None}
    for block in blocks:
        kernels[f"block_sparse_{block}"] = lambda q, k, v, m, b=block: attention.block_sparse_attention(q, k, v, m, b)
        padded = -(-seq // block) * block
        padded_mask = np.pad(mask, ((0, 0), (0, padded - seq), (0, padded - seq)))
        live = attention.live_blocks(jnp.asarray(padded_mask), block)
        tiles[f"block_sparse_{block}"] = float(np.asarray(live).mean())
    n = -(-seq // model_config.attention_block)
    tiles[f"blockwise_{model_config.attention_block}"] = (n + 1) / (2 * n)

    mask_j = jnp.asarray(mask)  # an argument, not a closure constant, as in the model
    reference = np.asarray(jax.jit(attention.einsum_attention)(q, k, v, mask_j))
    runs, agreement = {}, {}
    for name, kernel in kernels.items():
        out = np.asarray(jax.jit(kernel)(q, k, v, mask_j))
        agreement[name] = float(np.abs(out - reference)[real_queries].max())
        grad = jax.jit(jax.grad(lambda q, k, v, m, kernel=kernel: jnp.sum(jnp.sin(kernel(q, k, v, m))),
                                argnums=(0, 1, 2)))
        jax.block_until_ready(grad(q, k, v, mask_j))  # compile
        runs[name] = lambda grad=grad: grad(q, k, v, mask_j)[0]
    kernel_times = interleaved(runs, args.iters)
    base = statistics.median(kernel_times[f"blockwise_{model_config.attention_block}"])
    kernel_results = {name: {**summary(t), "tiles_computed": round(tiles[name], 3),
                             "max_abs_diff_vs_einsum": agreement[name],
                             "speedup_vs_blockwise_median": round(base / statistics.median(t), 3)}
                      for name, t in kernel_times.items()}

    step_results = {}
    if not args.no_step:
        mesh = build_mesh(dataclasses.replace(config.mesh, data=1), devices=jax.devices()[:1])
        impls = {"einsum": ("einsum", model_config.attention_block),
                 f"blockwise_{model_config.attention_block}": ("blockwise", model_config.attention_block)}
        impls.update({f"block_sparse_{b}": ("block_sparse", b) for b in blocks})
        step_runs, losses = {}, {}
        with use_mesh(mesh):
            batch = place_micro_batches(host_batches, mesh)
            for name, (impl, block) in impls.items():
                variant = dataclasses.replace(model_config, attention_impl=impl, attention_block=block)
                model = omnimol_constructor(variant, config.graph, seed=config.seed)()
                program = run_train_program(model, config, num_tasks=len(pipeline.task_keys))
                state, frozen = program.initial_state(), program.frozen
                step = jax.jit(program.steps.train_step)
                losses[name] = float(jax.device_get(step(state, frozen, batch)[1]["loss"]))
                step_runs[name] = lambda step=step, state=state, frozen=frozen: step(state, frozen, batch)[1]["loss"]
            step_times = interleaved(step_runs, args.iters)
        base = statistics.median(step_times[f"blockwise_{model_config.attention_block}"])
        step_results = {name: {**summary(t), "loss": losses[name],
                               "loss_diff_vs_einsum": losses[name] - losses["einsum"],
                               "speedup_vs_blockwise_median": round(base / statistics.median(t), 3)}
                        for name, t in step_times.items()}

    prefill_results = {}
    if args.prefill_rows:
        prefill_results = prefill(model_config, args, blocks)

    print(json.dumps({
        "benchmark": "attention", "config": args.config, "overrides": args.overrides, "threads": pinned,
        "rows": rows, "seq_len": seq, "heads": model_config.num_heads, "kv_heads": model_config.num_kv_heads,
        "head_dim": model_config.head_dim,
        "real_token_share": round(float((segment_ids > 0).mean()), 3),
        "samples_per_row": round(float(np.mean([len(set(r[r > 0])) for r in segment_ids])), 2),
        "unmasked_score_share": round(float(mask.mean()), 4),
        "kernels_forward_backward": kernel_results, "train_step": step_results, "prefill": prefill_results,
        "machine": describe_machine(),
    }, indent=2))


if __name__ == "__main__":
    main()

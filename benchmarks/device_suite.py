"""One call, one JSON: forward, train step and generation at `small` and `llama3_2_1b`+MoGE shapes, and the MoGE
formulations, on whatever accelerator jax sees (random weights, bf16). Run through device_suite.sh.

    python benchmarks/device_suite.py [--smoke] [--profile DIR] [--out FILE] [--budget-s 420]
--smoke: tiny shapes (what the tests run on CPU). Every part records its compile time, step time (min and median
of a few), tokens/s, the MFU against the chip's peak (KNOWN_PEAKS in omnimol_jax/train/flops.py, or a measured
matmul on CPUs), and the device's peak memory where jax reports it. Parts that would exceed the time budget are
skipped and say so. `attention_kernels` times the train step with blockwise attention against the platform's
Pallas kernel (flash on GPU, splash on TPU). `cudnn_attention` says whether `model.attention_impl: jax` with
packing's segment mask compiles to cuDNN's fused attention (a custom call in the optimized HLO) or falls back to
XLA's implementation.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from machine import describe_machine  # benchmarks/machine.py (the script folder is on sys.path)

from omnimol_jax.config import GraphConfig, LoRAConfig, MeshConfig, MoGEConfig, TrainConfig, model_config_from_preset
from omnimol_jax.inference.decoding import GenerationConfig, Generator
from omnimol_jax.model.build import omnimol_constructor
from omnimol_jax.sharding import build_mesh, create_sharded_model, use_mesh
from omnimol_jax.train.flops import compiled_flops, device_peak_flops, step_costs
from omnimol_jax.train.program import build_train_program
from omnimol_jax.train.recipes import trainable_filter
from omnimol_jax.train.step import make_optimizer

GRAPH = GraphConfig(num_layers=2, hidden_size=32)


def timed(fn, iters: int) -> list[float]:
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times


def peak_memory() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def text_batch(ids: np.ndarray, segments: int = 1) -> dict:
    """A packed-looking text batch: `segments` samples per row (segment ids 1..n, positions restarting)."""
    batch, seq = ids.shape
    per = seq // segments
    segment_ids = np.minimum(np.arange(seq) // per + 1, segments).astype(np.int32)
    positions = (np.arange(seq) - (segment_ids - 1) * per).astype(np.int32)
    return {"input_ids": ids, "labels": ids, "positions": np.tile(positions, (batch, 1)),
            "segment_ids": np.tile(segment_ids, (batch, 1)), "attention_mask": np.ones((batch, seq), np.int32),
            "token_task_ids": np.zeros((batch, seq), np.int32), "graphs": None}


def build(config, mesh):
    return create_sharded_model(omnimol_constructor(config, GRAPH, seed=0), mesh)


def forward_part(config, mesh, batch: int, seq: int, iters: int, peak: float) -> dict:
    model = build(config, mesh)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (batch, seq)), jnp.int32)
    forward = jax.jit(lambda m, x: m(x).logits)
    start = time.perf_counter()
    with use_mesh(mesh):
        compiled = forward.lower(model, ids).compile()
    compile_s = time.perf_counter() - start
    times = timed(lambda: compiled(model, ids), iters)
    flops = compiled_flops(compiled)
    return {"compile_s": round(compile_s, 2), "step_s_min": round(min(times), 5),
            "step_s_median": round(statistics.median(times), 5), "tokens_per_s": round(batch * seq / min(times), 1),
            "mfu": round(flops / min(times) / peak, 4) if peak else None}


def train_part(config, mesh, batch: int, seq: int, iters: int, peak: float, profile: str | None) -> dict:
    model = build(config, mesh)
    tx, schedule = make_optimizer(TrainConfig(max_steps=1000, learning_rate=1e-4))
    program = build_train_program(model, trainable_filter(2), tx, schedule, num_tasks=1,
                                  aux_loss_coef=config.moge.aux_loss_coef)
    steps, state, frozen = program.steps, program.initial_state(mesh=mesh), program.frozen
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (batch, seq)).astype(np.int32)
    micro = jax.tree.map(lambda x: jnp.asarray(x[None]), text_batch(ids, segments=2))
    step = jax.jit(steps.train_step, donate_argnums=(0,))
    start = time.perf_counter()
    with use_mesh(mesh):
        lowered = step.lower(state, frozen, micro)
        compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    with use_mesh(mesh):  # XLA counts a loop once: the loss chunks (and scanned layers) counted in full
        flops, _ = step_costs(compiled, lowered, steps.train_step, state, frozen, micro)
    holder = {"state": state}

    def run():
        holder["state"], metrics = compiled(holder["state"], frozen, micro)
        return metrics

    times = timed(run, iters)
    if profile:
        jax.profiler.start_trace(profile)
        timed(run, 3)
        jax.profiler.stop_trace()
    return {"compile_s": round(compile_s, 2), "step_s_min": round(min(times), 5),
            "step_s_median": round(statistics.median(times), 5), "tokens_per_s": round(batch * seq / min(times), 1),
            "gflop_per_step": round(flops / 1e9, 2), "mfu": round(flops / min(times) / peak, 4) if peak else None}


def generate_part(config, mesh, rows: int, prompt_len: int, new_tokens: int, iters: int) -> dict:
    model = build(config, mesh)
    generator = Generator(model, pad_token_id=0, stop_token_ids=[config.vocab_size - 1], mesh=mesh)
    prompts = np.random.default_rng(0).integers(1, config.vocab_size - 1, (rows, prompt_len)).tolist()
    gen = GenerationConfig(max_new_tokens=new_tokens)
    start = time.perf_counter()
    generator.generate(prompts, gen)
    first_s = time.perf_counter() - start  # compile + one run
    first_token = GenerationConfig(max_new_tokens=1)
    generator.generate(prompts, first_token)
    ttft = timed(lambda: generator.generate(prompts, first_token).tokens, iters)
    times = timed(lambda: generator.generate(prompts, gen).tokens, iters)
    return {"rows": rows, "prompt_len": prompt_len, "new_tokens": new_tokens, "compile_and_first_s": round(first_s, 2),
            "time_to_first_token_s": round(min(ttft), 4), "s_min": round(min(times), 4),
            "new_tokens_per_s": round(rows * new_tokens / min(times), 1)}


def moge_part(config, batch: int, seq: int, iters: int) -> dict:
    """One MoE layer's forward + backward per formulation (same weights and input)."""
    from omnimol_jax.model.dtypes import dtype_of
    from omnimol_jax.model.llama import Projection
    from omnimol_jax.model.lora import LoRAScale, LoRAWeight, RouterWeight
    from omnimol_jax.model.moge import MoGEFeedForward

    out = {}
    h = jax.random.normal(jax.random.key(0), (batch, seq, config.hidden_size), dtype_of(config.dtype))
    mask = jnp.ones((batch, seq), bool)
    for impl in ("stacked", "fused", "naive"):
        cfg = dataclasses.replace(config, moge=dataclasses.replace(config.moge, implementation=impl))
        kw = dict(dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype), init_std=0.02)
        layer = MoGEFeedForward(cfg, Projection, kw, rngs=nnx.Rngs(0))
        graphdef, trainable, frozen = nnx.split(layer, nnx.Any(LoRAWeight, LoRAScale, RouterWeight), ...)

        def loss(tr, fr, h, graphdef=graphdef):
            y, aux = nnx.merge(graphdef, tr, fr)(h, mask)
            return jnp.sum(y.astype(jnp.float32) ** 2) + 0.01 * aux["aux_loss"]

        start = time.perf_counter()
        compiled = jax.jit(jax.grad(loss)).lower(trainable, frozen, h).compile()
        compile_s = time.perf_counter() - start
        times = timed(lambda: compiled(trainable, frozen, h), iters)
        memory = compiled.memory_analysis()
        out[impl] = {"compile_s": round(compile_s, 2), "step_s_min": round(min(times), 5),
                     "temp_bytes": int(getattr(memory, "temp_size_in_bytes", 0))}
    return out


def attention_kernels_part(config, mesh, batch: int, seq: int, iters: int, peak: float) -> dict:
    """The whole train step with the XLA blockwise attention against this platform's Pallas kernel (flash on GPU,
    splash on TPU; on CPU both run in Pallas interpret mode, which says nothing about speed)."""
    pallas = {"gpu": ["flash"], "tpu": ["splash"]}.get(jax.default_backend(), ["splash", "flash"])
    out = {}
    for impl in ["blockwise", *pallas]:
        out[impl] = train_part(dataclasses.replace(config, attention_impl=impl), mesh, batch, seq, iters, peak, None)
    for impl in pallas:
        out[f"{impl}_speedup_vs_blockwise"] = round(out["blockwise"]["step_s_min"] / out[impl]["step_s_min"], 3)
    return out


def cudnn_attention(config, mesh) -> dict:
    cfg = dataclasses.replace(config, attention_impl="jax")
    model = nnx.eval_shape(omnimol_constructor(cfg, GRAPH, seed=0))
    batch = text_batch(np.zeros((2, 256), np.int32), segments=2)
    fn = jax.jit(lambda m, b: m(b["input_ids"], positions=b["positions"], segment_ids=b["segment_ids"]).logits)
    try:
        with use_mesh(mesh):
            text = fn.lower(model, {k: v for k, v in batch.items() if v is not None}).compile().as_text()
    except Exception as err:  # noqa: BLE001 - report, do not stop the suite
        return {"error": str(err).splitlines()[0]}
    fused = "cudnn" in text.lower() and "custom-call" in text
    return {"platform": jax.default_backend(), "cudnn_fused_attention": fused,
            "note": "cuDNN's fused attention" if fused else "XLA's attention (the explicit packing mask is not "
                                                           "a pattern jax hands to cuDNN)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU, tests)")
    parser.add_argument("--profile", default=None, help="write an XLA trace of 3 train steps here (per preset)")
    parser.add_argument("--out", default="device_suite.json")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip parts once this much time is spent")
    args = parser.parse_args()
    began = time.perf_counter()
    mesh = build_mesh(MeshConfig(), jax.devices())
    peak, peak_source = device_peak_flops()
    lora = LoRAConfig(enabled=True, rank=64 if not args.smoke else 8, dropout=0.0)
    dtype = {"param_dtype": "bfloat16", "dtype": "bfloat16"}
    if args.smoke:
        presets = {"tiny": model_config_from_preset("tiny", lora=lora, moge=MoGEConfig(enabled=True, layers="all"),
                                                    **dtype)}
        shapes = dict(batch=2, seq=64, iters=2, rows=4, prompt_len=16, new_tokens=8)
    else:
        moge = MoGEConfig(enabled=True)
        presets = {"small": model_config_from_preset("small", lora=lora, moge=moge, **dtype),
                   "llama3_2_1b_moge": model_config_from_preset("llama3_2_1b", lora=lora, moge=moge, **dtype)}
        shapes = dict(batch=8, seq=1024, iters=5, rows=32, prompt_len=128, new_tokens=64)
    result = {"benchmark": "device_suite", "smoke": args.smoke, "devices": len(jax.devices()),
              "device_kind": jax.devices()[0].device_kind, "peak_flops": peak, "peak_source": peak_source,
              "presets": {}, "skipped": []}
    for name, config in presets.items():
        entry = result["presets"].setdefault(name, {})
        parts = {
            "forward": lambda c=config: forward_part(c, mesh, shapes["batch"], shapes["seq"], shapes["iters"], peak),
            "train_step": lambda c=config, n=name: train_part(
                c, mesh, shapes["batch"], shapes["seq"], shapes["iters"], peak,
                str(Path(args.profile) / n) if args.profile else None),
            "generate": lambda c=config: generate_part(c, mesh, shapes["rows"], shapes["prompt_len"],
                                                       shapes["new_tokens"], shapes["iters"]),
            "moge_layer": lambda c=config: moge_part(c, shapes["batch"], shapes["seq"], shapes["iters"]),
            "attention_kernels": lambda c=config: attention_kernels_part(c, mesh, shapes["batch"], shapes["seq"],
                                                                         shapes["iters"], peak),
        }
        for part, run in parts.items():
            if time.perf_counter() - began > args.budget_s:
                result["skipped"].append(f"{name}/{part}: over the {args.budget_s:.0f} s budget")
                continue
            try:
                entry[part] = run()
            except Exception as err:  # noqa: BLE001 - one failing part must not lose the others' figures
                entry[part] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
                               "traceback": traceback.format_exc(limit=3)}
            entry["peak_memory_bytes"] = peak_memory()
    result["cudnn_attention"] = cudnn_attention(next(iter(presets.values())), mesh)
    result["seconds"] = round(time.perf_counter() - began, 1)
    result["machine"] = describe_machine()
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

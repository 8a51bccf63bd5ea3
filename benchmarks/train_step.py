"""Train-step throughput of the `small` preset: our jitted step (MoGE and plain LoRA) vs transformers + peft.

    python benchmarks/train_step.py [--batch 4 --seq 256 --iters 3 --rank 16]
Our side runs the trainer's own step function (omnimol_jax.train.step: loss, gradients of the trainables,
clipping, AdamW) on a text-only batch. The torch side is transformers.LlamaForCausalLM with peft LoRA on the
same projections, AdamW on the adapters, same weights and batch. Both run on this machine in this run, next
to the machine's measured peak matmul FLOP/s. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from hf_reference import torch_twin
from machine import describe_machine  # benchmarks/machine.py (the script folder is on sys.path)

from omnimol_jax.checkpoint import omnimol_constructor
from omnimol_jax.config import GraphConfig, LoRAConfig, MoGEConfig, TrainConfig, model_config_from_preset
from omnimol_jax.train.flops import compiled_flops, measure_matmul_peak
from omnimol_jax.train.recipes import trainable_filter
from omnimol_jax.train.step import StateLayout, TrainState, flatten_state, make_optimizer, make_step_functions

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def text_batch(ids: np.ndarray) -> dict:
    batch, seq = ids.shape
    ones = np.ones((batch, seq), np.int32)
    return {"input_ids": ids, "labels": ids, "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1)),
            "segment_ids": ones, "attention_mask": ones, "token_task_ids": np.zeros((batch, seq), np.int32),
            "graphs": None}


def ours(config, ids, iters: int) -> dict:
    model = omnimol_constructor(config, GraphConfig(num_layers=1, hidden_size=16), seed=0)()
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(2), ...)
    layout = StateLayout.of(trainable)
    train_config = TrainConfig(max_steps=1000, learning_rate=1e-4)
    tx, schedule = make_optimizer(train_config)
    steps = make_step_functions(graphdef, layout, tx, num_tasks=1, aux_loss_coef=config.moge.aux_loss_coef,
                                task_balanced=False, schedule=schedule)
    params = flatten_state(trainable)
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.key_data(jax.random.key(0)),
                       jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))
    batch = jax.tree.map(lambda x: x[None], text_batch(ids))  # one micro-batch
    step = jax.jit(steps.train_step, donate_argnums=(0,))
    start = time.perf_counter()
    compiled = step.lower(state, frozen, batch).compile()
    compile_s = time.perf_counter() - start
    state, metrics = compiled(state, frozen, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        state, metrics = compiled(state, frozen, batch)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    flops = compiled_flops(compiled)
    return {"step_s": round(step_s, 4), "tokens_per_s": round(ids.size / step_s, 1), "compile_s": round(compile_s, 2),
            "flops_per_step": flops, "achieved_flops_per_s": flops / step_s, "loss": float(metrics["loss"]),
            "trainable_parameters": int(sum(x.size for x in jax.tree.leaves(params)))}, model


def torch_peft(config, model, ids, iters: int, rank: int) -> dict:
    from peft import LoraConfig, get_peft_model

    twin = torch_twin(config, model.language_model, attn_implementation="sdpa").train()
    peft_model = get_peft_model(twin, LoraConfig(r=rank, lora_alpha=config.lora.alpha, lora_dropout=0.0,
                                                 target_modules=TARGETS))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4,
                                  weight_decay=0.0)
    ids_t = torch.from_numpy(ids.astype(np.int64))

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = peft_model(input_ids=ids_t, labels=ids_t).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in peft_model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        return loss

    step()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    return {"step_s": round(step_s, 4), "tokens_per_s": round(ids.size / step_s, 1), "loss": float(loss),
            "trainable_parameters": int(sum(p.numel() for p in peft_model.parameters() if p.requires_grad)),
            "torch_threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()

    base = model_config_from_preset("small")
    lora = LoRAConfig(enabled=True, rank=args.rank, dropout=0.0, gal=False)
    configs = {"moge": dataclasses.replace(base, lora=lora, moge=MoGEConfig(enabled=True)),
               "lora": dataclasses.replace(base, lora=lora)}
    ids = np.random.default_rng(0).integers(0, base.vocab_size, (args.batch, args.seq)).astype(np.int32)
    peak = measure_matmul_peak()
    results, lora_model = {}, None
    for name, config in configs.items():
        results[name], model = ours(config, ids, args.iters)
        results[name]["achieved_over_peak"] = round(results[name]["achieved_flops_per_s"] / peak, 3)
        if name == "lora":
            lora_model = model
    results["torch_peft_lora"] = torch_peft(configs["lora"], lora_model, ids, args.iters, args.rank)
    print(json.dumps({
        "benchmark": "train_step", "preset": "small", "batch": args.batch, "seq_len": args.seq,
        "lora_rank": args.rank, "dtype": base.dtype,
        "machine_peak_matmul_flops_per_s": peak,
        "omnimol_jax_moge": results["moge"], "omnimol_jax_lora": results["lora"],
        "torch_peft_lora": results["torch_peft_lora"],
        "lora_jax_over_torch_tokens_per_s": round(results["lora"]["tokens_per_s"]
                                                  / results["torch_peft_lora"]["tokens_per_s"], 3),
        "loss_after_steps_jax_vs_torch": [results["lora"]["loss"], results["torch_peft_lora"]["loss"]],
        "machine": describe_machine(),
    }, indent=2))


if __name__ == "__main__":
    main()

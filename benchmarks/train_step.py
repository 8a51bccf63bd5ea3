"""Train-step throughput of the `small` preset: our jitted step (MoGE and plain LoRA) vs transformers + peft.

    python benchmarks/train_step.py [--batch 4 --seq 256 --iters 5 --rank 16] [--threads 1]
Our side runs the trainer's own step function (omnimol_jax.train.step: loss, gradients of the trainables,
clipping, AdamW) on a text-only batch. The torch side is transformers.LlamaForCausalLM with peft LoRA on the
same projections, AdamW on the adapters, same weights and batch. Both run on this machine in this run, next
to the machine's measured peak matmul FLOP/s, timed interleaved (min and median); --threads pins both to the same
cores. Prints one JSON object.
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
import numpy as np
import torch
from hf_reference import torch_twin
from machine import describe_machine, pin_threads  # benchmarks/machine.py (the script folder is on sys.path)

from omnimol_jax.config import GraphConfig, LoRAConfig, MoGEConfig, TrainConfig, model_config_from_preset
from omnimol_jax.model.build import omnimol_constructor
from omnimol_jax.train.flops import measure_matmul_peak, step_costs
from omnimol_jax.train.program import build_train_program
from omnimol_jax.train.recipes import trainable_filter
from omnimol_jax.train.step import make_optimizer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def text_batch(ids: np.ndarray) -> dict:
    batch, seq = ids.shape
    ones = np.ones((batch, seq), np.int32)
    return {"input_ids": ids, "labels": ids, "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1)),
            "segment_ids": ones, "attention_mask": ones, "token_task_ids": np.zeros((batch, seq), np.int32),
            "graphs": None}


def ours(config, ids):
    """(facts, one-step callable, model): the trainer's step function, compiled."""
    model = omnimol_constructor(config, GraphConfig(num_layers=1, hidden_size=16), seed=0)()
    tx, schedule = make_optimizer(TrainConfig(max_steps=1000, learning_rate=1e-4))
    program = build_train_program(model, trainable_filter(2), tx, schedule, num_tasks=1,
                                  aux_loss_coef=config.moge.aux_loss_coef)
    steps, state, frozen = program.steps, program.initial_state(), program.frozen
    batch = jax.tree.map(lambda x: x[None], text_batch(ids))  # one micro-batch
    step = jax.jit(steps.train_step, donate_argnums=(0,))
    start = time.perf_counter()
    lowered = step.lower(state, frozen, batch)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    flops, _ = step_costs(compiled, lowered, steps.train_step, state, frozen, batch)  # loops counted in full
    holder = {"state": state}

    def run():
        holder["state"], metrics = compiled(holder["state"], frozen, batch)
        jax.block_until_ready(holder["state"])
        return float(metrics["loss"])

    run()
    memory = compiled.memory_analysis()
    return {"compile_s": round(compile_s, 2), "flops_per_step": flops,
            "temp_bytes": int(getattr(memory, "temp_size_in_bytes", 0)),
            "trainable_parameters": int(sum(x.size for x in jax.tree.leaves(program.trainable)))}, run, model


def torch_peft(config, model, ids, rank: int):
    from peft import LoraConfig, get_peft_model

    twin = torch_twin(config, model.language_model, attn_implementation="sdpa").train()
    peft_model = get_peft_model(twin, LoraConfig(r=rank, lora_alpha=config.lora.alpha, lora_dropout=0.0,
                                                 target_modules=TARGETS))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4,
                                  weight_decay=0.0)
    ids_t = torch.from_numpy(ids.astype(np.int64))

    def run():
        optimizer.zero_grad(set_to_none=True)
        loss = peft_model(input_ids=ids_t, labels=ids_t).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in peft_model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        return float(loss)

    run()
    return {"trainable_parameters": int(sum(p.numel() for p in peft_model.parameters() if p.requires_grad)),
            "torch_threads": torch.get_num_threads()}, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="pin both to this many cores (0: all)")
    args = parser.parse_args()
    pinned = pin_threads(args.threads)

    base = model_config_from_preset("small")
    lora = LoRAConfig(enabled=True, rank=args.rank, dropout=0.0, gal=False)
    configs = {"moge": dataclasses.replace(base, lora=lora, moge=MoGEConfig(enabled=True)),
               "lora": dataclasses.replace(base, lora=lora)}
    ids = np.random.default_rng(0).integers(0, base.vocab_size, (args.batch, args.seq)).astype(np.int32)
    peak = measure_matmul_peak()
    facts, runs, lora_model = {}, {}, None
    for name, config in configs.items():
        facts[name], runs[name], model = ours(config, ids)
        if name == "lora":
            lora_model = model
    facts["torch_peft_lora"], runs["torch_peft_lora"] = torch_peft(configs["lora"], lora_model, ids, args.rank)
    times: dict[str, list[float]] = {name: [] for name in runs}
    losses: dict[str, float] = {}
    for _ in range(args.iters):  # interleaved: each round times every contender once
        for name, run in runs.items():
            start = time.perf_counter()
            losses[name] = run()
            times[name].append(time.perf_counter() - start)
    results = {}
    for name in runs:
        step_min, step_median = min(times[name]), statistics.median(times[name])
        results[name] = {**facts[name], "step_s_min": round(step_min, 4), "step_s_median": round(step_median, 4),
                         "tokens_per_s": round(ids.size / step_median, 1), "loss": losses[name]}
        if "flops_per_step" in facts[name]:
            results[name]["achieved_over_peak"] = round(facts[name]["flops_per_step"] / step_min / peak, 3)
    print(json.dumps({
        "benchmark": "train_step", "preset": "small", "batch": args.batch, "seq_len": args.seq,
        "lora_rank": args.rank, "dtype": base.dtype, "threads": pinned,
        "machine_peak_matmul_flops_per_s": peak,
        "omnimol_jax_moge": results["moge"], "omnimol_jax_lora": results["lora"],
        "torch_peft_lora": results["torch_peft_lora"],
        "lora_jax_over_torch_median": round(results["torch_peft_lora"]["step_s_median"]
                                            / results["lora"]["step_s_median"], 3),
        "lora_jax_over_torch_min": round(results["torch_peft_lora"]["step_s_min"] / results["lora"]["step_s_min"], 3),
        "machine": describe_machine(),
    }, indent=2))


if __name__ == "__main__":
    main()

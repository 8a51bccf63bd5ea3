"""Generation throughput: our jitted KV-cache decoder vs transformers `generate()` (torch), same weights, same work.

    python benchmarks/generate.py [--preset small] [--batches 1,32] [--prompt-len 64] [--new-tokens 64]
                                  [--iters 3] [--threads N]

Greedy, text-only, every row generating exactly --new-tokens tokens (the only stop token is one neither model
emits; the script checks). Random weights (`model.preset=small`). Prints one JSON object: for each batch size
the generated tokens/s of both (best of --iters timed runs after a warm-up, medians beside them; the runs of
the two are interleaved so that both see the same background load of a shared machine; --threads pins both to
the same cores, 0 = all), their ratio, our
compile time, and how many leading generated ids agree between the two (float rounding may flip a near-tie
later on random weights). Both timings include the prefill; ours also host<->device transfers and padding.
Against the roofline: the useful FLOPs of the run (every matmul of the prefill and of each decode step, the LM
head at the positions whose logits are used, attention over the real context) over its best time, as a share of
this machine's measured fp32 matmul peak: how far either could still go. At batch 32 a decode step is a set
of [32, d] x [d, f] matmuls, and the share shows how close both already are to what the cores can do.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # hf_reference helpers

import numpy as np
import torch
from flax import nnx
from hf_reference import torch_twin
from machine import (  # benchmarks/machine.py (the script folder is on sys.path)
    describe_machine,
    interleaved,
    pin_threads,
)

from omnimol_jax.config import model_config_from_preset
from omnimol_jax.inference import GenerationConfig, Generator
from omnimol_jax.model.llama import LlamaForCausalLM, count_parameters
from omnimol_jax.train.flops import measure_matmul_peak


def leading_agreement(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row, how many leading ids of a and b are equal."""
    differs = a != b
    return np.where(differs.any(axis=1), differs.argmax(axis=1), a.shape[1])


def useful_flops(config, parameters: int, batch: int, prompt_len: int, new_tokens: int) -> float:
    """Matmul FLOPs a generation of `new_tokens` after `prompt_len` must do, per the model's shapes."""
    table = config.vocab_size * config.hidden_size
    body = parameters - table * (1 if config.tie_word_embeddings else 2)  # the layers' matmul weights (+ norms)
    head = table  # logits: d x vocab per position whose logits are used
    per_context = 4 * config.num_layers * config.num_heads * config.head_dim  # q.k and p.v per (query, key) pair
    prefill = prompt_len * 2 * body + 2 * head + per_context * prompt_len * (prompt_len + 1) / 2
    # the first new token comes from the prefill's logits; each later one is a decode step over the cache
    steps = new_tokens - 1
    decode = steps * (2 * body + 2 * head) + per_context * sum(prompt_len + 1 + i for i in range(steps))
    return batch * (prefill + decode)


def run_batch(generator, twin, config, batch: int, prompt_len: int, new_tokens: int, iters: int, stop: int,
              parameters: int, peak: float) -> dict:
    rng = np.random.default_rng(batch)
    prompts = rng.integers(3, config.vocab_size - 1, (batch, prompt_len)).astype(np.int32)
    settings = GenerationConfig(max_new_tokens=new_tokens)

    ids_t = torch.from_numpy(prompts.astype(np.int64))
    kwargs = dict(attention_mask=torch.ones_like(ids_t), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                  do_sample=False, num_beams=1, eos_token_id=stop, pad_token_id=0)

    def run_jax():
        return generator.generate(list(prompts), settings)

    def run_torch():
        with torch.inference_mode():
            return twin.generate(ids_t, **kwargs)

    start = time.perf_counter()
    out = run_jax()  # compiles
    compile_and_first_s = time.perf_counter() - start
    torch_out = run_torch()  # warm-up; greedy, so every later run gives these ids again
    times = interleaved({"jax": run_jax, "torch": run_torch}, iters)
    jax_times, torch_times = times["jax"], times["torch"]
    jax_ids = out.tokens[:, 0]
    torch_ids = torch_out[:, prompt_len:].numpy()

    generated = batch * new_tokens
    jax_tps = generated / min(jax_times)
    torch_tps = generated / min(torch_times)
    agree = leading_agreement(jax_ids, torch_ids)
    flops = useful_flops(config, parameters, batch, prompt_len, new_tokens)
    return {
        "batch": batch, "generated_tokens": generated,
        "jax_tokens_per_s": round(jax_tps, 1), "torch_tokens_per_s": round(torch_tps, 1),
        "jax_over_torch": round(jax_tps / torch_tps, 3),
        "jax_tokens_per_s_median": round(generated / statistics.median(jax_times), 1),
        "torch_tokens_per_s_median": round(generated / statistics.median(torch_times), 1),
        "jax_run_s": [round(t, 3) for t in jax_times], "torch_run_s": [round(t, 3) for t in torch_times],
        "jax_compile_and_first_run_s": round(compile_and_first_s, 2),
        "useful_gflop": round(flops / 1e9, 2),
        "jax_achieved_over_peak": round(flops / min(jax_times) / peak, 3),
        "torch_achieved_over_peak": round(flops / min(torch_times) / peak, 3),
        "all_rows_full_length": bool((out.lengths == new_tokens).all() and torch_ids.shape[1] == new_tokens
                                     and not (jax_ids == stop).any()),
        "leading_ids_agree_min": int(agree.min()), "leading_ids_agree_mean": round(float(agree.mean()), 2),
        "rows_fully_equal": int((agree == new_tokens).sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--torch-attention", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--threads", type=int, default=0, help="pin both to this many cores (0: all)")
    args = parser.parse_args()
    pinned = pin_threads(args.threads)

    config = model_config_from_preset(args.preset)
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    stop = config.vocab_size - 1  # a stop id neither model picks on these prompts (checked per batch)
    generator = Generator(model, pad_token_id=0, stop_token_ids=[stop], min_prompt_bucket=args.prompt_len)
    twin = torch_twin(config, model, args.torch_attention)
    parameters = count_parameters(config)
    peak = measure_matmul_peak()
    results = [run_batch(generator, twin, config, int(b), args.prompt_len, args.new_tokens, args.iters, stop,
                         parameters, peak) for b in args.batches.split(",")]
    print(json.dumps({
        "benchmark": "generate", "preset": args.preset, "parameters": parameters,
        "decoding": "greedy, text only, fixed length", "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens, "dtype": config.dtype, "iters": args.iters,
        "torch_attention": twin.config._attn_implementation, "machine_peak_matmul_flops_per_s": round(peak),
        "threads": pinned,
        "results": results,
        "machine": describe_machine(),
    }, indent=2))


if __name__ == "__main__":
    main()

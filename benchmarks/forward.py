"""Forward-pass throughput: our jitted Llama vs transformers.LlamaForCausalLM (torch), same weights and batch.

    python benchmarks/forward.py [--preset small] [--batch 4] [--seq 256] [--iters 5] [--threads N]
Prints one JSON object: tokens/s of each (best and median of --iters runs, the two interleaved so that both see
the same background load; --threads pins both to the same cores, 0 = all), their ratio, the XLA compile time,
and the max logit difference (so a fast-but-wrong result cannot hide).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # hf_reference helpers

import jax
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
from omnimol_jax.model.llama import LlamaForCausalLM, count_parameters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--torch-attention", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--threads", type=int, default=0, help="pin both to this many cores (0: all)")
    args = parser.parse_args()
    pinned = pin_threads(args.threads)

    config = model_config_from_preset(args.preset)
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (args.batch, args.seq)).astype(np.int32)
    tokens = args.batch * args.seq

    forward = jax.jit(lambda s, i: nnx.merge(graphdef, s)(i).logits)
    start = time.perf_counter()
    compiled = forward.lower(state, ids).compile()
    compile_s = time.perf_counter() - start
    jax_logits = np.asarray(compiled(state, ids))

    twin = torch_twin(config, model, args.torch_attention)
    ids_t = torch.from_numpy(ids.astype(np.int64))
    with torch.inference_mode():
        torch_logits = twin(input_ids=ids_t).logits.numpy()
        times = interleaved({"jax": lambda: compiled(state, ids).block_until_ready(),
                             "torch": lambda: twin(input_ids=ids_t)}, args.iters)
    jax_times, torch_times = times["jax"], times["torch"]

    jax_tps = tokens / min(jax_times)
    torch_tps = tokens / min(torch_times)
    print(json.dumps({
        "benchmark": "forward", "preset": args.preset, "parameters": count_parameters(config),
        "batch": args.batch, "seq_len": args.seq, "dtype": config.dtype, "iters": args.iters,
        "jax_tokens_per_s": round(jax_tps, 1), "torch_tokens_per_s": round(torch_tps, 1),
        "jax_over_torch": round(jax_tps / torch_tps, 3), "jax_compile_s": round(compile_s, 2),
        "jax_tokens_per_s_median": round(tokens / statistics.median(jax_times), 1),
        "torch_tokens_per_s_median": round(tokens / statistics.median(torch_times), 1),
        "jax_over_torch_median": round(statistics.median(torch_times) / statistics.median(jax_times), 3),
        "jax_step_s_median": round(statistics.median(jax_times), 4),
        "torch_step_s_median": round(statistics.median(torch_times), 4),
        "max_abs_logit_diff": float(np.abs(jax_logits - torch_logits).max()),
        "torch_attention": twin.config._attn_implementation, "threads": pinned,
        "machine": describe_machine(),
    }, indent=2))


if __name__ == "__main__":
    main()

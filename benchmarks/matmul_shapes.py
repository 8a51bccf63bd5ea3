"""One matmul at a time, XLA:CPU against torch, at the shapes a model's steps are made of.

    python benchmarks/matmul_shapes.py [--preset small] [--rows 32,1024] [--iters 7] [--threads N]

For each row count M (32: a decode step at batch 32; 1024: a train step's 4 x 256 tokens) and each weight of
the preset (q/o, k/v, gate/up, down, the tied LM head), the achieved GFLOP/s of `x @ w` in a jitted JAX
function, with the weight stored [in, out] (how this project's projections store it) and [out, in], and in torch
(`F.linear` on [out, in], the layout transformers uses), best of --iters timed loops, interleaved.
Prints one JSON object. It shows how much of the generation and train-step gaps to torch is the GEMM kernels
themselves (the same at every call site) rather than how the model uses them.
"""
from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import torch
from machine import (  # benchmarks/machine.py (the script folder is on sys.path)
    describe_machine,
    interleaved,
    pin_threads,
)

from omnimol_jax.config import model_config_from_preset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--rows", default="32,1024")
    parser.add_argument("--iters", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="pin both to this many cores (0: all)")
    args = parser.parse_args()
    pinned = pin_threads(args.threads)
    config = model_config_from_preset(args.preset)
    d, f, hd = config.hidden_size, config.intermediate_size, config.head_dim
    weights = {"q_proj / o_proj": (d, config.num_heads * hd), "k_proj / v_proj": (d, config.num_kv_heads * hd),
               "gate_proj / up_proj": (d, f), "down_proj": (f, d), "lm_head (tied)": (d, config.vocab_size)}
    rng = np.random.default_rng(0)
    results = []
    for rows in (int(r) for r in args.rows.split(",")):
        for name, (k, n) in weights.items():
            x = rng.standard_normal((rows, k), np.float32)
            w = rng.standard_normal((n, k), np.float32)  # [out, in], as torch and the tied embedding store it
            jx, jw, jw_in_out = jnp.asarray(x), jnp.asarray(w), jnp.asarray(np.ascontiguousarray(w.T))
            linear = jax.jit(lambda a, b: jnp.einsum("mk,nk->mn", a, b))
            matmul = jax.jit(lambda a, b: a @ b)
            linear(jx, jw).block_until_ready()
            matmul(jx, jw_in_out).block_until_ready()
            tx, tw = torch.from_numpy(x), torch.from_numpy(w)
            flops = 2.0 * rows * k * n
            loops = max(3, int(1e9 / flops))
            with torch.inference_mode():
                torch.nn.functional.linear(tx, tw)
                times = interleaved({"in_out": lambda: matmul(jx, jw_in_out), "out_in": lambda: linear(jx, jw),
                                     "torch": lambda: torch.nn.functional.linear(tx, tw)}, args.iters, loops)
            jax_s, jax_t_s, torch_s = times["in_out"], times["out_in"], times["torch"]
            results.append({"rows": rows, "weight": name, "shape": [rows, k, n],
                            "jax_gflop_per_s": round(flops / min(jax_s) / 1e9, 1),
                            "jax_out_in_gflop_per_s": round(flops / min(jax_t_s) / 1e9, 1),
                            "torch_gflop_per_s": round(flops / min(torch_s) / 1e9, 1),
                            "jax_over_torch": round(min(torch_s) / min(jax_s), 3)})
    print(json.dumps({"benchmark": "matmul_shapes", "preset": args.preset, "dtype": "float32", "threads": pinned,
                      "results": results,
                      "machine": describe_machine()}, indent=2))


if __name__ == "__main__":
    main()

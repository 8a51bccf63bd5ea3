"""Does the stored layout of the projection kernels matter in place? [in, out] (how this project stores them) vs
[out, in] (torch's layout, which XLA:CPU multiplies faster alone at 32 rows: benchmarks/matmul_shapes.py).

    python benchmarks/kernel_layout.py [--preset small] [--iters 7]

Builds the model twice with the same weights, the second with every Projection kernel transposed to
[out..., in...] and contracted on its trailing dims (a patch local to this script), checks the logits are
identical, then times a forward of 4 x 256 tokens and one decode step at batch 32 against a 128-slot cache,
interleaved. Prints one JSON object with min and median per variant.
"""
from __future__ import annotations

import argparse
import json
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from machine import describe_machine, interleaved  # benchmarks/machine.py (the script folder is on sys.path)

from omnimol_jax.config import model_config_from_preset
from omnimol_jax.inference.decoding import forward_last
from omnimol_jax.model.kv_cache import init_kv_cache
from omnimol_jax.model.llama import LlamaForCausalLM, Projection

_stored_in_out = Projection.__call__


def _call(self, x):
    if not getattr(self, "stored_out_in", False):
        return _stored_in_out(self, x)
    kernel = self.kernel[...].astype(self.dtype)
    n = self.num_contract
    return jnp.tensordot(x.astype(self.dtype), kernel,
                         axes=(list(range(x.ndim - n, x.ndim)), list(range(kernel.ndim - n, kernel.ndim))))


Projection.__call__ = _call


def build(config, out_in: bool):
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    if out_in:
        for _, module in nnx.iter_modules(model):
            if isinstance(module, Projection):
                kernel, n = np.asarray(module.kernel[...]), module.num_contract
                order = list(range(n, kernel.ndim)) + list(range(n))
                module.kernel = nnx.Param(jnp.asarray(np.ascontiguousarray(np.transpose(kernel, order))))
                module.stored_out_in = True
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--iters", type=int, default=7)
    args = parser.parse_args()
    config = model_config_from_preset(args.preset)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (4, 256)).astype(np.int32)
    rows, slots = 32, 128
    cache = init_kv_cache(config, rows, slots)
    cache = cache._replace(valid=jnp.ones((rows, slots), jnp.bool_).at[:, 100:].set(False), index=jnp.int32(100),
                           num_valid=jnp.full((rows,), 100, jnp.int32))
    tokens = jnp.arange(rows, dtype=jnp.int32)
    runs, logits = {}, {}
    for name in ("in_out", "out_in"):
        graphdef, state = nnx.split(build(config, name == "out_in"))
        forward = jax.jit(lambda s, i, g=graphdef: nnx.merge(g, s)(i).logits)
        step = jax.jit(lambda s, t, c, g=graphdef: forward_last(nnx.merge(g, s), t[:, None],
                                                                 jnp.ones((rows, 1), jnp.int32), c, None)[0])
        logits[name] = np.asarray(forward(state, ids))
        runs[name] = {"forward": lambda s=state, f=forward: f(s, ids).block_until_ready(),
                      "decode_step": lambda s=state, f=step: f(s, tokens, cache).block_until_ready()}
        runs[name]["decode_step"]()
    times = interleaved({f"{name}/{kind}": fn for name, fns in runs.items() for kind, fn in fns.items()}, args.iters)
    print(json.dumps({
        "benchmark": "kernel_layout", "preset": args.preset, "iters": args.iters,
        "max_logit_diff": float(np.abs(logits["in_out"] - logits["out_in"]).max()),
        "results": {name: {"min_ms": round(min(v) * 1e3, 1), "median_ms": round(statistics.median(v) * 1e3, 1)}
                    for name, v in times.items()},
        "machine": describe_machine(),
    }, indent=2))


if __name__ == "__main__":
    main()

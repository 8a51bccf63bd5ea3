"""Where the train step spends its time: each component's forward + backward, compiled and timed alone at the
step's shapes, beside the whole step.

    python benchmarks/breakdown.py [--config configs/demo.yaml] [--iters 5] [key=value ...]
Components, as the trainer's step meets them (stage-2 recipe: gradients for the adapters, routers and projector,
none for the frozen weights): the graph tower + projector, each decoder layer's attention block (norm, q/k/v/o with
LoRA, rotary, masked attention over the packed row), each dense MLP block and each MoGE block (with its router and
aux loss), the LM head + cross entropy (chunked as configured), and the optimizer update (clipping + AdamW). Every
component is timed as jax.grad of a scalar of its output with respect to its input activations and its trainable
parameters, so that its backward pass does the work it does inside the step. Prints one JSON object: each
component's seconds (median of --iters), its share of the components' sum, and the whole step's time, with the
component sum / step ratio telling how much XLA gains by fusing across components.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from machine import describe_machine  # benchmarks/machine.py (the script folder is on sys.path)

from omnimol_jax.aot.programs import host_batch
from omnimol_jax.config import batch_geometry, load_config
from omnimol_jax.model.build import omnimol_constructor
from omnimol_jax.model.llama import LayerInputs, rope_inverse_frequencies
from omnimol_jax.train.program import run_train_program
from omnimol_jax.train.recipes import run_trainable_filter


def timed(fn, iters: int) -> float:
    jax.block_until_ready(fn())  # compile + warm-up
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def grad_time(module: nnx.Module, call, inputs, iters: int, trainable, prefix: tuple = (),
              within: tuple = ()) -> float:
    """Median seconds of grad(sum of call(module, inputs)) w.r.t. the inputs and the module's trainables (the run's
    filter, applied to the module's paths inside the full model: `prefix`; only under the `within` top-level parts
    when given)."""
    is_trainable = nnx.filterlib.to_predicate(trainable)

    def wanted(path, value):
        path = prefix + tuple(path)
        return is_trainable(path, value) and (not within or path[0] in within)

    graphdef, params, rest = nnx.split(module, wanted, ...)

    def loss(params, inputs):
        out = call(nnx.merge(graphdef, params, rest), inputs)
        return sum(jnp.sum(leaf.astype(jnp.float32)) for leaf in jax.tree.leaves(out))

    differentiable = all(jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.inexact) for leaf in jax.tree.leaves(inputs))
    step = jax.jit(jax.grad(loss, argnums=(0, 1) if differentiable else 0))  # graphs are integers: params only
    return timed(lambda: step(params, inputs), iters)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = parser.parse_args()
    config = load_config(args.config, args.overrides)
    model_config, data = config.model, config.data
    model = omnimol_constructor(model_config, config.graph, seed=0)()
    trainable = run_trainable_filter(config)
    lm = model.language_model
    rows = batch_geometry(config, 1, 1).process_rows  # one micro-batch of this host
    seq, dim = data.seq_len, model_config.hidden_size
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(0, 1, (rows, seq, dim)), jnp.float32).astype(jnp.dtype(model_config.dtype))
    # packed rows: about three samples per row, as the demo's packing gives
    segments = np.minimum(np.arange(seq) * 3 // seq + 1, 3)[None].repeat(rows, 0).astype(np.int32)
    segment_start = np.array([np.argmax(segments[0] == s) for s in segments[0]])
    positions = (np.arange(seq) - segment_start).astype(np.int32)[None].repeat(rows, 0)
    real = jnp.ones((rows, seq), jnp.bool_)
    inputs = LayerInputs(jnp.asarray(positions), jnp.asarray(rope_inverse_frequencies(model_config)), real,
                         jnp.asarray(segments), None, real)
    key = jax.random.key(0)

    components: dict[str, float] = {}
    moe_layers = set(model_config.moge.layer_indices(model_config.num_layers))
    layer = lm.layers[0]
    attention = grad_time(layer, lambda m, x: m.self_attn(m.input_layernorm(x), inputs.positions, inputs.inv_freq,
                                                          inputs.key_valid, inputs.segment_ids, None, None, key)[0],
                          x, args.iters, trainable, ("language_model", "layers", 0))
    components["attention"] = attention * model_config.num_layers
    dense = [i for i in range(model_config.num_layers) if i not in moe_layers]
    if dense:
        mlp = grad_time(lm.layers[dense[0]], lambda m, x: m.mlp(m.post_attention_layernorm(x), key), x, args.iters,
                        trainable, ("language_model", "layers", dense[0]))
        components["dense_mlp"] = mlp * len(dense)
    if moe_layers:
        moe = grad_time(lm.layers[min(moe_layers)],
                        lambda m, x: m.mlp(m.post_attention_layernorm(x), inputs.token_mask, key), x, args.iters,
                        trainable, ("language_model", "layers", min(moe_layers)))
        components["moge"] = moe * len(moe_layers)
    targets = jnp.asarray(rng.integers(0, model_config.vocab_size, (rows, seq - 1)), jnp.int32)
    chunk = config.train.loss_chunk or seq
    components["lm_head_ce"] = grad_time(lm, lambda m, h: m.chunked_cross_entropy(m.norm(h), targets, chunk),
                                         x[:, :-1], args.iters, trainable, ("language_model",))
    batch = jax.tree.map(lambda a: jnp.asarray(a)[None], host_batch(config, rows))  # the step's shapes
    graphs = jax.tree.map(lambda a: a[0], batch["graphs"])
    components["graph_tower_projector"] = grad_time(model, lambda m, g: m.encode_graphs(g), graphs, args.iters,
                                                    trainable, within=("graph_tower", "projector"))

    program = run_train_program(model, config, num_tasks=1)
    params, frozen, tx = program.trainable, program.frozen, program.tx
    opt_state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    update = jax.jit(lambda g, s, p: tx.update(g, s, p))
    components["optimizer"] = timed(lambda: update(grads, opt_state, params), args.iters)

    state = program.initial_state()
    train_step = jax.jit(program.steps.train_step)
    step_s = timed(lambda: train_step(state, frozen, batch), args.iters)

    total = sum(components.values())
    print(json.dumps({
        "benchmark": "breakdown", "config": args.config, "overrides": args.overrides, "rows": rows, "seq_len": seq,
        "components_s": {k: round(v, 4) for k, v in components.items()},
        "share": {k: round(v / total, 3) for k, v in components.items()},
        "components_sum_s": round(total, 4), "train_step_s": round(step_s, 4),
        "sum_over_step": round(total / step_s, 3), "machine": describe_machine(),
    }, indent=2))


if __name__ == "__main__":
    main()

"""`omnimol info` (resolved config, parameter count, shardings) and `omnimol init` (random checkpoint)."""
from __future__ import annotations

import argparse
import dataclasses
import json

import yaml

CONFIG_HELP = ("run config YAML (default: the packaged base config, a tiny model); key=value overrides follow, "
               "e.g. model.preset=small")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help=CONFIG_HELP)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")


def load_run_config(args):
    from omnimol_jax.config import BASE_CONFIG, load_config

    return load_config(args.config or BASE_CONFIG, args.overrides)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("info", help="print the resolved config, parameter count and (optionally) shardings",
                              description="Validates a config (with overrides) without building anything big.")
    _add_config_args(p)
    p.add_argument("--shardings", action="store_true", help="also list every parameter's PartitionSpec on the mesh")
    p.add_argument("--topology", default=None,
                   help="describe the batch on this target instead of this host: a TPU slice name (v5p-16; needs "
                        "libtpu, `pip install 'omnimol-jax[tpu]'`) or cpu:N")
    p.set_defaults(func=_info)

    p = subparsers.add_parser("init", help="write a randomly initialised model checkpoint",
                              description="Initialises the configured Llama (with --full: the whole Omni-Mol model, "
                                          "graph tower and projector included) directly sharded over the mesh and "
                                          "saves it as an omnimol checkpoint (useful for tests and benchmarks; "
                                          "generate and eval need --full).")
    _add_config_args(p)
    p.add_argument("--out", required=True, help="checkpoint directory to create")
    p.add_argument("--full", action="store_true",
                   help="the full Omni-Mol model (language model, graph tower, projector), not the language model")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_init)

    p = subparsers.add_parser("check-hf", help="compare a checkpoint's logits with transformers on a HF folder",
                              description="Logit checker: max |diff|, KL and top-1 agreement on a short and a "
                                          "~500-token prompt against transformers' load of a HF folder or a GGUF "
                                          "file. Exit code 1 if max |diff| exceeds --tolerance times the largest "
                                          "|logit| (at least 1).")
    p.add_argument("--checkpoint", required=True)
    reference = p.add_mutually_exclusive_group(required=True)
    reference.add_argument("--hf", help="HF folder with the same weights (e.g. from export-hf)")
    reference.add_argument("--gguf", help="the GGUF file the checkpoint was imported from (or a packaged model)")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="max |diff| allowed per unit of the largest |reference logit| (fp32 rounding scales with it)")
    p.add_argument("--seq-lens", default="8,500", help="comma-separated prompt lengths")
    p.set_defaults(func=_check_hf)


def _info(args) -> int:
    from omnimol_jax.model.omnimol import variable_counts

    if args.topology:
        from omnimol_jax.cli.compile import _give_cpu_devices

        _give_cpu_devices(args.topology)
    config = load_run_config(args)
    print(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False), end="")
    counts = variable_counts(config.model, config.graph)
    parts = ", ".join(f"{name.replace('_', ' ')} {count:,}" for name, count in counts.items())
    print(f"# parameters: {sum(counts.values()):,} ({parts}; with adapters, routers and batch-norm statistics, "
          "as train counts them)")
    from omnimol_jax.allocator import SWITCH, in_use

    print(f"# malloc: {in_use()} (set {SWITCH}=system for glibc's)")
    from omnimol_jax import cpu_gemm

    print(f"# XLA:CPU matmuls: {cpu_gemm.in_effect()} (set {cpu_gemm.SWITCH}=default for XLA's own)")
    import jax

    from omnimol_jax.caches import SWITCH as CACHE_SWITCH

    print(f"# compilation cache: {jax.config.jax_compilation_cache_dir or 'off'} (set {CACHE_SWITCH}=off or a folder)")
    print(f"# batch: {_batch_geometry(config, args.topology).describe()}")
    if args.shardings:
        import jax
        from flax import nnx

        from omnimol_jax.model.build import llama_constructor
        from omnimol_jax.sharding import build_mesh, state_shardings

        mesh = build_mesh(config.mesh)
        abstract = nnx.eval_shape(llama_constructor(config.model))
        shardings = state_shardings(nnx.state(abstract, nnx.Param), mesh)
        print(f"# mesh: {dict(mesh.shape)} over {len(jax.devices())} device(s)")
        for path, variable in nnx.to_flat_state(shardings):
            print(f"{'/'.join(map(str, path)):55s} {variable.get_value().spec}")
    return 0


def _batch_geometry(config, topology):
    """data.global_batch_size on --topology, or on this host's processes and the config's mesh."""
    if topology:
        from omnimol_jax.aot.programs import target_geometry
        from omnimol_jax.aot.topology import resolve

        return target_geometry(config, resolve(topology))
    import jax

    from omnimol_jax.config import batch_geometry
    from omnimol_jax.sharding import batch_shard_count, build_mesh

    return batch_geometry(config, jax.process_count(), batch_shard_count(build_mesh(config.mesh)))


def _init(args) -> int:
    from omnimol_jax.checkpoint import save_random_checkpoint

    save_random_checkpoint(load_run_config(args), args.out, full=args.full, overwrite=args.overwrite)
    print(f"wrote {args.out}")
    return 0


def _check_hf(args) -> int:
    from omnimol_jax.convert.logit_check import check_against_hf

    reports = check_against_hf(args.checkpoint, args.hf, [int(s) for s in args.seq_lens.split(",")], gguf=args.gguf)
    ok = all(r.ok(args.tolerance) for r in reports)
    print(json.dumps({"tolerance": args.tolerance, "ok": ok, "reports": [dataclasses.asdict(r) for r in reports]},
                     indent=2))
    return 0 if ok else 1

"""`omnimol compile --config X --topology v5p-16 [key=value ...]`: will this run fit, and how fast can it go?"""
from __future__ import annotations

import argparse
import json
import os
import sys

from omnimol_jax.cli.model import CONFIG_HELP


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compile", help="compile a run's train step and generation program for a TPU slice or CPU devices (AOT)",
        description="Builds the config's mesh over the devices of --topology (a TPU slice described by libtpu: "
                    "pip install 'omnimol-jax[tpu]'; or cpu:N fake CPU devices) and compiles the real jitted train "
                    "step (shardings, donation, remat as configured) and the generation program, allocating "
                    "nothing. Reports per device: argument, output, temporary and code bytes against the chip's "
                    "memory, FLOPs and bytes per step, the roofline step time and the MFU it allows. Exit code 1 "
                    "when a program does not fit.")
    p.add_argument("--config", default=None, help=CONFIG_HELP)
    p.add_argument("--topology", required=True,
                   help="v5p-16, v5e-256, v6e-64, v4-32 (Cloud TPU slice names), v5e:4x4 (libtpu topology), cpu:8")
    p.add_argument("--programs", default="train,generate", help="comma-separated: train, generate")
    p.add_argument("--prompt-len", type=int, default=None, help="generation prompt length (default min(seq_len, 512))")
    p.add_argument("--new-tokens", type=int, default=64, help="generation: tokens decoded after the prompt")
    p.add_argument("--hbm-gib", type=float, default=None,
                   help="memory per device to check against, in GiB (default: the chip's; for cpu:N host RAM / N)")
    p.add_argument("--out", default=None, help="also write the report as JSON here")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    # programs for devices this host does not have: nothing to reuse, and their entries cannot load here
    p.set_defaults(func=_compile, compile_cache=False)


def _give_cpu_devices(topology: str) -> None:
    """cpu:N needs N host devices, which XLA reads from XLA_FLAGS when its backends start."""
    from omnimol_jax.aot.topology import cpu_device_flag

    flag = cpu_device_flag(topology)
    if flag is None:
        return
    try:
        from jax._src import xla_bridge  # no public way to ask whether the backends have started

        started = xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):
        started = "jax" in sys.modules
    if not started:
        os.environ["XLA_FLAGS"] = flag


def _compile(args) -> int:
    _give_cpu_devices(args.topology)
    from omnimol_jax.aot.programs import compile_run, report_table, target_geometry
    from omnimol_jax.aot.topology import resolve
    from omnimol_jax.cli.model import load_run_config

    config = load_run_config(args)
    target = resolve(args.topology)
    if args.hbm_gib is not None:
        target.hbm_bytes = int(args.hbm_gib * 2 ** 30)
    programs = tuple(p.strip() for p in args.programs.split(",") if p.strip())
    unknown = sorted(set(programs) - {"train", "generate"})
    if unknown:
        from omnimol_jax.errors import InputError

        raise InputError(f"--programs: unknown program(s) {unknown}; choose from train, generate")
    geometry = target_geometry(config, target)  # a global batch that does not divide stops before compiling
    print(f"batch: {geometry.describe()}")
    reports = compile_run(config, target, programs, prompt_len=args.prompt_len, new_tokens=args.new_tokens)
    print(report_table(target, reports))
    if args.out:
        payload = {"topology": args.topology, "devices": len(target.devices), "device_kind": target.device_kind,
                   "hosts": target.num_hosts, "config": args.config, "overrides": args.overrides,
                   "batch": geometry.to_dict(), "programs": [r.to_dict() for r in reports]}
        with open(args.out, "w") as f:
            json.dump(payload, f, indent=2)
    too_big = [r.name for r in reports if not r.fits]
    if too_big:
        print(f"error: {', '.join(too_big)} does not fit {target.name}: see the bytes above", file=sys.stderr)
        return 1
    return 0

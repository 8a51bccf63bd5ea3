"""`omnimol` command line: thin argparse modules, one per capability, that parse arguments and call the library.

A module in COMMAND_MODULES provides `register(subparsers)`, adding parsers whose `func` attribute takes the
parsed args and returns an exit code. Modules import the library lazily, inside `func`, so that `omnimol --help`
stays fast and a broken optional dependency only affects its own command. Config overrides have one syntax
everywhere: `key=value` (e.g. `train.max_steps=100 init.hf=/models/llama`).
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES: list[str] = [
    "omnimol_jax.cli.model",
    "omnimol_jax.cli.convert",
    "omnimol_jax.cli.data",
    "omnimol_jax.cli.train",
    "omnimol_jax.cli.evaluate",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="omnimol",
        description="Omni-Mol in JAX/Flax: train, evaluate and convert multitask molecular LLMs.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # A flag that looks like a config key (`--init.hf X`) gets the one override syntax spelled out.
        dotted = next((flag for flag in extra if flag.startswith("--") and "." in flag.split("=")[0]), None)
        hint = f" (config overrides are key=value, e.g. {dotted[2:].split('=')[0]}=VALUE)" if dotted else ""
        parser.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

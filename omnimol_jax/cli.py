"""`omnimol` command line. Each capability lives in its own module, which registers its subcommands here.

A module in COMMAND_MODULES provides `register(subparsers)`, adding parsers whose `func` attribute takes the
parsed args and returns an exit code. Modules are imported lazily per subcommand so that `omnimol --help`
stays fast and a broken optional dependency only affects its own command.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# (subcommand names, module that registers them)
COMMAND_MODULES: list[str] = [
    "omnimol_jax.model_cli",
    "omnimol_jax.convert.cli",
    "omnimol_jax.data.cli",
    "omnimol_jax.train.cli",
    "omnimol_jax.eval_cli",
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
    if extra and not getattr(args, "accepts_extra_flags", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra_flags = extra
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

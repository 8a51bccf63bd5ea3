"""`omnimol` command line: thin argparse modules, one per capability, that parse arguments and call the library.

A module in COMMAND_MODULES provides `register(subparsers)`, adding parsers whose `func` attribute takes the
parsed args and returns an exit code. Modules import the library lazily, inside `func`, so that `omnimol --help`
stays fast and a broken optional dependency only affects its own command. Config overrides have one syntax
everywhere: `key=value` (e.g. `train.max_steps=100 init.hf=/models/llama`).

Errors reach the user as one line on stderr, `error: <what is wrong, naming the file, record or key>`, and an
exit code: 2 for bad input, 1 for a run that could not finish (omnimol_jax.errors). `--debug` (anywhere on the
command line) or OMNIMOL_DEBUG=1 shows the full traceback instead.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import logging
import os
import sys
import threading

COMMAND_MODULES: list[str] = [
    "omnimol_jax.cli.model",
    "omnimol_jax.cli.convert",
    "omnimol_jax.cli.data",
    "omnimol_jax.cli.train",
    "omnimol_jax.cli.compile",
    "omnimol_jax.cli.evaluate",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="omnimol",
        description="Omni-Mol in JAX/Flax: train, evaluate and convert multitask molecular LLMs.",
    )
    parser.add_argument("--debug", action="store_true",
                        help="show full tracebacks instead of one-line errors (also OMNIMOL_DEBUG=1); may be "
                             "given after the command too")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(sub)
    return parser


@contextlib.contextmanager
def one_line_background_errors(restore: bool = True):
    """Without --debug, libraries' background errors stay one line too: a log record's traceback (Orbax logs the
    failures of its writer threads with theirs) becomes its last line, and errors in threads and finalisers (an
    asyncio loop closed after a failed save) are logged as one line instead of printed with a traceback. The
    command-line program keeps this until it exits (`restore=False`): Orbax's failed writes report themselves when
    collected, at interpreter exit."""
    make_record = logging.getLogRecordFactory()
    hooks = (sys.unraisablehook, threading.excepthook)

    def one_line_record(*args, **kwargs):
        record = make_record(*args, **kwargs)
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            first_line = (str(error).splitlines() or [""])[0]
            record.msg = f"{record.getMessage()} ({type(error).__name__}: {first_line})"
            record.args, record.exc_info, record.exc_text = (), None, None
        record.stack_info = None
        return record

    def unraisable(info) -> None:
        logging.getLogger("omnimol_jax.cli").debug("ignored in %r: %s: %s", info.object, info.exc_type.__name__,
                                                   info.exc_value)

    def thread_error(info) -> None:
        logging.getLogger("omnimol_jax.cli").warning("error in thread %s: %s: %s", getattr(info.thread, "name", "?"),
                                                     info.exc_type.__name__, info.exc_value)

    logging.setLogRecordFactory(one_line_record)
    sys.unraisablehook, threading.excepthook = unraisable, thread_error
    try:
        yield
    finally:
        if restore:
            gc.collect()  # failed futures report themselves when collected: while the one-line factory is in place
            logging.setLogRecordFactory(make_record)
            sys.unraisablehook, threading.excepthook = hooks


def debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("OMNIMOL_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def main(argv: list[str] | None = None) -> int:
    program = argv is None  # the `omnimol` program, not a call from Python (tests, notebooks)
    if program:
        from omnimol_jax.allocator import reexec_with_preload

        reexec_with_preload(sys.argv[1:])  # once, before anything runs: mimalloc for XLA:CPU (see allocator.py)
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and isinstance(getattr(args, "overrides", None), list):
        # argparse ends a `key=value ...` positional at the first flag; overrides after a flag
        # (`omnimol train --config C --no-progress train.max_steps=8`) are overrides all the same.
        late = [a for a in extra if "=" in a and not a.startswith("-")]
        args.overrides += late
        extra = [a for a in extra if a not in late]
    if extra:
        # A flag that looks like a config key (`--init.hf X`) gets the one override syntax spelled out.
        dotted = next((flag for flag in extra if flag.startswith("--") and "." in flag.split("=")[0]), None)
        hint = f" (config overrides are key=value, e.g. {dotted[2:].split('=')[0]}=VALUE)" if dotted else ""
        parser.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if program:  # before jax starts: XLA:CPU's GEMM back-end (cpu_gemm.py)
        from omnimol_jax import cpu_gemm

        cpu_gemm.apply()
    if program and getattr(args, "compile_cache", True):  # reuse compiled programs across runs (caches.py)
        from omnimol_jax.caches import enable_compilation_cache

        enable_compilation_cache()
    try:
        if debug:
            return int(args.func(args) or 0)
        with one_line_background_errors(restore=not program):
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the one place where any error becomes a one-line message
        if debug:
            raise
        from omnimol_jax.errors import describe

        message, code, expected = describe(err)
        hint = "" if expected else " (an unexpected error: rerun with --debug for the traceback)"
        print(f"error: {message}{hint}", file=sys.stderr)
        if program:  # reported: what Orbax's writer threads and asyncio report again at exit adds nothing
            for name in ("asyncio", "absl"):
                logging.getLogger(name).setLevel(logging.CRITICAL)
        return code


if __name__ == "__main__":
    sys.exit(main())

"""A faster malloc for XLA's CPU runtime: mimalloc (from the `cmeel-mimalloc` wheel) preloaded, freed pages kept.

Why: XLA:CPU allocates a step's scratch buffers anew every step. glibc's malloc hands large blocks back to the
OS and the next step faults them in again (about 1.5 GB of page faults per demo train step). mimalloc with
`MIMALLOC_PURGE_DELAY=-1` keeps freed pages for reuse. The price is that the process's resident memory stays at
its peak.

The `omnimol` program re-executes itself once with the library in LD_PRELOAD (LD_PRELOAD only works when a
process starts). Set `OMNIMOL_ALLOCATOR=system` to keep glibc's malloc. Other launchers can take the same
settings from `python -m omnimol_jax.allocator` (it prints `export` lines; the Makefile and launch/*.sh use it).
"""
from __future__ import annotations

import importlib.metadata
import os
import sys
from pathlib import Path
from typing import Mapping, MutableMapping, Optional

SWITCH = "OMNIMOL_ALLOCATOR"  # mimalloc (default) | system
LIBRARY = "libmimalloc.so"
# Keep freed memory (no purge back to the OS); a user's own MIMALLOC_* settings win.
SETTINGS = {"MIMALLOC_PURGE_DELAY": "-1"}


def library_path() -> Optional[Path]:
    """libmimalloc.so inside the installed cmeel-mimalloc wheel, or None (other platforms, not installed)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        dist = importlib.metadata.distribution("cmeel-mimalloc")
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(dist.locate_file(f"cmeel.prefix/lib/{LIBRARY}"))
    return path if path.is_file() else None


def wanted(env: Mapping[str, str] = os.environ) -> bool:
    return env.get(SWITCH, "mimalloc").strip().lower() not in ("system", "glibc", "off", "0", "none")


def is_preloaded(env: Mapping[str, str] = os.environ) -> bool:
    return any(Path(p).name.startswith(("libmimalloc", "libjemalloc", "libtcmalloc"))
               for p in env.get("LD_PRELOAD", "").replace(":", " ").split())


def preload_environment(env: Mapping[str, str] = os.environ) -> Optional[dict[str, str]]:
    """`env` with mimalloc preloaded and its settings, or None when not wanted, already done, or unavailable."""
    library = library_path()
    if library is None or not wanted(env) or is_preloaded(env):
        return None
    out = dict(env)
    out["LD_PRELOAD"] = " ".join([str(library)] + env.get("LD_PRELOAD", "").split())
    for key, value in SETTINGS.items():
        out.setdefault(key, value)
    return out


def reexec_with_preload(argv: list[str], env: MutableMapping[str, str] = os.environ) -> None:
    """Replaces this process by `python -m omnimol_jax.cli ARGV` with mimalloc preloaded (returns if not needed)."""
    new_env = preload_environment(env)
    if new_env is None:
        return
    new_env[SWITCH] = env.get(SWITCH, "mimalloc")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "omnimol_jax.cli", *argv], new_env)


def in_use() -> str:
    """Which malloc this process runs: the preloaded library's name, or 'glibc' (from /proc/self/maps)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    for name in ("libmimalloc", "libjemalloc", "libtcmalloc"):
        if name in maps:
            return name[3:]
    return "glibc"


def main() -> int:
    """Prints the `export` lines for a shell launcher (nothing when not wanted or not available)."""
    env = preload_environment()
    if env is not None:
        for key in ("LD_PRELOAD", *SETTINGS):
            print(f"export {key}='{env[key]}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())

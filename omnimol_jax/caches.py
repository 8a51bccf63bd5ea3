"""Where omnimol keeps what it can reuse between runs: the user cache folder (WordNet for METEOR, XLA programs).

`user_cache_dir()` is `$OMNIMOL_CACHE_DIR`, else `$XDG_CACHE_HOME/omnimol-jax`, else `~/.cache/omnimol-jax`.

`enable_compilation_cache()` turns on JAX's persistent compilation cache in `<user cache>/xla`, so a second
`omnimol train|eval|generate` with the same shapes loads its compiled programs instead of compiling them again.
`OMNIMOL_COMPILE_CACHE=off` turns it off, `OMNIMOL_COMPILE_CACHE=<folder>` moves it; a cache folder set for JAX
itself (`JAX_COMPILATION_CACHE_DIR`) wins over both.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

SWITCH = "OMNIMOL_COMPILE_CACHE"
OFF = ("0", "off", "false", "no", "none")

logger = logging.getLogger(__name__)


def user_cache_dir() -> Path:
    if os.environ.get("OMNIMOL_CACHE_DIR"):
        return Path(os.environ["OMNIMOL_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "omnimol-jax"


def enable_compilation_cache() -> Optional[str]:
    """Points JAX's persistent compilation cache at the omnimol cache folder; returns the folder, or None when off
    (switched off, or the folder cannot be created: then programs are compiled as without a cache)."""
    setting = os.environ.get(SWITCH, "").strip()
    if setting.lower() in OFF:
        return None
    import jax

    current = jax.config.jax_compilation_cache_dir
    if current:
        return str(current)
    folder = Path(setting) if setting else user_cache_dir() / "xla"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        logger.warning("no compilation cache (%s cannot be created: %s); set %s to a writable folder", folder,
                       err.strerror, SWITCH)
        return None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    return str(folder)

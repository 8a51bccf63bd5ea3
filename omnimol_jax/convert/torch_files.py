"""torch.save state-dict files (`.bin`, `.pth`) as numpy arrays, both ways, without unpickling objects.

Reading uses `torch.load(..., weights_only=True)` only, memory-mapped when the file is in torch's zip format (so a
large adapter is read one tensor at a time), and keeps each tensor's dtype (bfloat16 as ml_dtypes.bfloat16).
torch is needed only here; it is imported on first use, with a one-line error when it is not installed.
"""
from __future__ import annotations

import os
import re
from typing import Mapping

import ml_dtypes
import numpy as np

from omnimol_jax.errors import InputError


class TorchFileError(InputError):
    """A torch state-dict file is missing, unsafe or not a flat dict of tensors; the message names the file."""


def _torch():
    try:
        import torch
    except ImportError:  # torch is not an install requirement: only .bin/.pth files need it
        raise TorchFileError("reading or writing torch .bin/.pth files needs PyTorch: pip install torch") from None
    return torch


def to_numpy(tensor) -> np.ndarray:
    """A torch tensor as numpy, bfloat16 kept (through its int16 bits: numpy has no native bfloat16)."""
    torch = _torch()
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def from_numpy(array: np.ndarray):
    torch = _torch()
    array = np.ascontiguousarray(array)
    if array.dtype == np.dtype(ml_dtypes.bfloat16):
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(array.copy())


def load_lazy(path: str | os.PathLike) -> Mapping[str, object]:
    """The file's {name: torch tensor}, memory-mapped where torch can; raises TorchFileError naming the file."""
    torch = _torch()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise TorchFileError(f"{path}: no such file")
    loaded = None
    for mmap in (True, False):  # mmap needs the zip format; legacy files are read whole
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            break
        except Exception as error:  # torch raises several types for corrupt, legacy or unsafe files
            if mmap and "zipfile" in str(error).lower() and "weights only" not in str(error).lower():
                continue
            first = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip().splitlines()[0].split(". ")[0].rstrip(".")
            raise TorchFileError(f"{path}: cannot be read as a weights-only torch file ({first})") from None
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise TorchFileError(f"{path}: expected a flat state dict of tensors, got {type(loaded).__name__}")
    return loaded


def read_state_dict(path: str | os.PathLike, float32: bool = False) -> dict[str, np.ndarray]:
    """The whole file as numpy arrays (floating tensors as float32 when `float32`)."""
    out = {}
    for key, tensor in load_lazy(path).items():
        value = to_numpy(tensor)
        if float32 and (value.dtype.kind == "f" or value.dtype == np.dtype(ml_dtypes.bfloat16)):
            value = value.astype(np.float32)
        out[str(key)] = value
    return out


def write_state_dict(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
    """torch.save of {name: tensor} (what the public code writes and reads with weights_only=True)."""
    torch = _torch()
    torch.save({name: from_numpy(value) for name, value in arrays.items()}, os.fspath(path))

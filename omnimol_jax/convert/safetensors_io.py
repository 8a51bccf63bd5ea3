"""Streaming safetensors I/O with numpy + ml_dtypes (bf16 included).

Reading parses only the JSON header and memory-maps each tensor on demand; writing emits the header
first and then one tensor at a time, so converting a model never holds more than one tensor beyond its
source. (The `safetensors` package's numpy API has no bfloat16 and writes whole dicts at once.)
File format: u64 little-endian header size, JSON header {name: {dtype, shape, data_offsets}}, raw data.
"""
from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path
from typing import Callable, Iterable, Optional

import ml_dtypes
import numpy as np

from omnimol_jax.errors import InputError

DTYPE_FROM_SAFETENSORS = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
SAFETENSORS_FROM_DTYPE = {v: k for k, v in DTYPE_FROM_SAFETENSORS.items()}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class SafetensorsError(InputError):
    """A safetensors file or index is malformed; the message names the file."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in `file`
    nbytes: int


def read_header(path: Path) -> tuple[dict, int]:
    """(header dict, absolute offset where tensor data starts)."""
    try:
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise SafetensorsError(f"{path}: too short to be a safetensors file")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > 100_000_000:
                raise SafetensorsError(f"{path}: implausible header size {header_len}")
            header = json.loads(f.read(header_len))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SafetensorsError(f"{path}: cannot read safetensors header: {err}") from err
    return header, 8 + header_len


def list_tensors(path: Path) -> dict[str, TensorInfo]:
    header, data_start = read_header(path)
    file_size = os.path.getsize(path)
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPE_FROM_SAFETENSORS[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except KeyError as err:
            raise SafetensorsError(f"{path}: tensor {name!r} has an unsupported or missing field {err}") from err
        if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or data_start + end > file_size:
            raise SafetensorsError(f"{path}: tensor {name!r} has data_offsets {begin}..{end} that do not match "
                                   f"shape {shape} x {dtype} or the file size {file_size}")
        tensors[name] = TensorInfo(name, path, dtype, shape, data_start + begin, end - begin)
    return tensors


def list_checkpoint_tensors(directory: Path) -> dict[str, TensorInfo]:
    """All tensors of a HF folder: `model.safetensors`, or the shards named by its index file."""
    directory = Path(directory)
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise SafetensorsError(f"{index_path}: not a valid safetensors index ({err})") from err
        tensors: dict[str, TensorInfo] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = directory / shard
            if not shard_path.is_file():
                raise SafetensorsError(f"{index_path}: names shard {shard!r}, which does not exist")
            for name, info in list_tensors(shard_path).items():
                tensors[name] = info
        missing = [n for n, shard in weight_map.items() if n not in tensors or tensors[n].file.name != shard]
        if missing:
            raise SafetensorsError(f"{index_path}: tensors listed in the index but not found in their shard: "
                                   f"{missing[:10]}")
        return tensors
    single = directory / SINGLE_FILE
    if single.is_file():
        return list_tensors(single)
    found = sorted(p.name for p in directory.glob("*.safetensors"))
    if found:  # e.g. a lone shard without its index
        tensors = {}
        for name in found:
            tensors.update(list_tensors(directory / name))
        return tensors
    raise SafetensorsError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE} found")


def load_tensor(info: TensorInfo) -> np.ndarray:
    """Reads one tensor (a private copy, not a view of the mapped file)."""
    with open(info.file, "rb") as f:
        f.seek(info.offset)
        data = f.read(info.nbytes)
    return np.frombuffer(data, dtype=info.dtype).reshape(info.shape).copy()


@dataclasses.dataclass(frozen=True)
class PlannedTensor:
    """A tensor to write: its name, dtype, shape and a function that produces it when its turn comes."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def write_file(path: Path, tensors: Iterable[PlannedTensor], metadata: Optional[dict[str, str]] = None,
               on_tensor: Optional[Callable[[PlannedTensor], None]] = None) -> None:
    """Writes one safetensors file, producing and writing tensors one at a time."""
    tensors = list(tensors)
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": SAFETENSORS_FROM_DTYPE[np.dtype(t.dtype)], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for t in tensors:
            array = np.ascontiguousarray(t.produce())
            if array.shape != t.shape or array.dtype != np.dtype(t.dtype):
                raise SafetensorsError(f"{path}: tensor {t.name} produced {array.shape} {array.dtype}, "
                                       f"planned {t.shape} {np.dtype(t.dtype)}")
            f.write(array.reshape(-1).view(np.uint8).data)  # no bytes copy of the tensor
            if on_tensor:
                on_tensor(t)
            del array


def plan_shards(tensors: list[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Greedy split in order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def write_checkpoint(directory: Path, tensors: list[PlannedTensor], max_shard_bytes: int,
                     on_tensor: Optional[Callable[[PlannedTensor], None]] = None) -> list[Path]:
    """Writes `model.safetensors`, or shards `model-0000i-of-0000n.safetensors` plus the index."""
    directory = Path(directory)
    shards = plan_shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        path = directory / SINGLE_FILE
        write_file(path, shards[0], on_tensor=on_tensor)
        return [path]
    paths, weight_map = [], {}
    for i, shard in enumerate(shards, start=1):
        path = directory / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_file(path, shard, on_tensor=on_tensor)
        paths.append(path)
        weight_map.update({t.name: path.name for t in shard})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return paths


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000, '500MiB' -> 524288000, '1234' -> 1234."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    s = str(text).strip().upper()
    number = s.rstrip("KMGTIB")
    unit = s[len(number):]
    try:
        value = float(number)
    except ValueError:
        raise SafetensorsError(f"cannot parse size {text!r}; use e.g. 5GB or 500MiB") from None
    if unit not in units:
        raise SafetensorsError(f"unknown size unit in {text!r}; use B, KB, MB, GB, KiB, MiB, GiB")
    return int(value * units[unit])

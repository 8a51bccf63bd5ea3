"""Readers for task files: the Omni-Mol dataset (one JSON list per task, `metadata.split`), Mol-Instructions
(molecule-oriented files) and our built-in corpus (same format, one file per task).

Files are never loaded whole. `iter_json_array` parses a JSON array incrementally with
`json.JSONDecoder.raw_decode` over fixed-size chunks; `TaskRecords` makes one such pass to keep only the
byte offsets of the records of one split (16 bytes a record) and later reads single records with `pread` on
the file descriptor it indexed, so a 180 MB file costs its page cache, not several GB of Python objects, and
supports the random access Grain needs.

Files are treated as immutable: `build-data` replaces a file by renaming a new one over it, and the open
descriptor keeps reading the old one. A file changed in place under a reader (truncated, rewritten) is reported
naming the file, never a SIGBUS as with mmap. Bytes that are not UTF-8 make only their record unusable.
"""
from __future__ import annotations

import array
import codecs
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np

from omnimol_jax.errors import InputError
from omnimol_jax.constants import (  # noqa: F401
    LAYOUT_MOL_INSTRUCTIONS,
    LAYOUT_OMNIMOL,
    LAYOUTS,
    SPLITS,
)
from omnimol_jax.tasks import (
    OUTPUT_NUMBER,
    OUTPUT_SELFIES,
    TASK_KEYS,
    TaskSpec,
    get_task,
)

REQUIRED_FIELDS = ("instruction", "input", "output")

# Reasons a record is skipped (the pipeline counts them per task).
REASON_MALFORMED = "malformed_record"
REASON_MISSING_FIELD = "missing_field"
REASON_WRONG_TYPE = "wrong_type"
REASON_EMPTY_ANSWER = "empty_answer"
REASON_BAD_MOLECULE = "unparseable_molecule"
REASON_TOO_LONG = "too_long"
REASON_TRUNCATED = "truncated"  # not a skip: an over-long sample kept cut at seq_len (data.overlong=truncate)
SKIP_REASONS = (REASON_MALFORMED, REASON_MISSING_FIELD, REASON_WRONG_TYPE, REASON_EMPTY_ANSWER,
                REASON_BAD_MOLECULE, REASON_TOO_LONG)

_WHITESPACE = " \t\n\r"

logger = logging.getLogger(__name__)


class DataFormatError(InputError):
    """A file or record does not have the expected format. The message names the file and record index."""

    def __init__(self, message: str, path: Optional[str | os.PathLike] = None, record_index: Optional[int] = None):
        where = []
        if path is not None:
            where.append(str(path))
        if record_index is not None:
            where.append(f"record {record_index}")
        super().__init__(f"{': '.join([', '.join(where), message]) if where else message}")
        self.path = None if path is None else str(path)
        self.record_index = record_index


class RecordError(DataFormatError):
    """One record is unusable for a reason from SKIP_REASONS (raised in strict mode, counted otherwise)."""

    def __init__(self, reason: str, message: str, path: Optional[str] = None, record_index: Optional[int] = None,
                 task: Optional[str] = None):
        prefix = f"[{task}] " if task else ""
        super().__init__(f"{prefix}{reason}: {message}", path, record_index)
        self.reason = reason
        self.task = task


# --------------------------------------------------------------------------------------------------
# Streaming JSON array parsing.


@dataclasses.dataclass(frozen=True)
class ArrayElement:
    index: int  # position in the array
    byte_start: int
    byte_end: int
    value: Any


def iter_json_array(path: str | os.PathLike, chunk_chars: int = 1 << 20,
                    name: Optional[str] = None) -> Iterator[ArrayElement]:
    """Yields the elements of a top-level JSON array one at a time, with their byte span in the file.

    Memory stays at about one chunk plus the largest element. A truncated or malformed file raises
    DataFormatError naming the file and the index of the element that failed. Bytes that are not UTF-8 are
    kept as lone surrogates (they fail when their record is read with `json.loads`), so the spans stay exact.
    `name` is the file's name in messages (default: `path`).
    """
    yield from _iter_json_array(str(path), chunk_chars, name or str(path))


def _iter_json_array(path: str, chunk_chars: int, name: str) -> Iterator[ArrayElement]:
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
    with open(path, "rb") as f:
        raw = f.read(chunk_chars)
        if raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8):]
            buffer_byte_start = len(codecs.BOM_UTF8)
        else:
            buffer_byte_start = 0
        buffer = utf8.decode(raw)
        eof = len(raw) == 0
        pos = 0  # char position in buffer
        pos_bytes = buffer_byte_start  # byte offset of buffer[pos]
        buffer_is_ascii = buffer.isascii()

        def more() -> bool:
            nonlocal buffer, eof, pos, buffer_is_ascii
            if eof:
                return False
            chunk = f.read(chunk_chars)
            if not chunk:
                eof = True
                tail = utf8.decode(b"", final=True)
                buffer = buffer[pos:] + tail
            else:
                buffer = buffer[pos:] + utf8.decode(chunk)
            pos = 0
            buffer_is_ascii = buffer.isascii()
            return True

        def skip_whitespace() -> bool:
            """Advances past whitespace; False at the end of the file."""
            nonlocal pos, pos_bytes
            while True:
                n = len(buffer)
                start = pos
                while pos < n and buffer[pos] in _WHITESPACE:
                    pos += 1
                pos_bytes += pos - start  # whitespace is ASCII
                if pos < n:
                    return True
                if not more():
                    return False

        if not skip_whitespace() or buffer[pos] != "[":
            raise DataFormatError("expected a JSON array (the file must start with '[')", name)
        pos += 1
        pos_bytes += 1
        index = 0
        expect_value = True  # after '[' or ','
        while True:
            if not skip_whitespace():
                raise DataFormatError(f"unexpected end of file inside the array (after {index} records)",
                                      name, index)
            char = buffer[pos]
            if char == "]":
                if expect_value and index > 0:
                    raise DataFormatError("trailing comma before ']'", name, index)
                return
            if not expect_value:
                if char != ",":
                    raise DataFormatError(f"expected ',' or ']' after a record, found {char!r}", name, index)
                pos += 1
                pos_bytes += 1
                expect_value = True
                continue
            while True:
                try:
                    value, end = decoder.raw_decode(buffer, pos)
                    # A value that ends exactly at the buffer end may be cut (a number); read on to be sure.
                    if end < len(buffer) or eof:
                        break
                except json.JSONDecodeError as err:
                    if eof:
                        if err.msg.startswith("Unterminated") or err.pos >= len(buffer.rstrip()) - 1:
                            raise DataFormatError(f"the file ends inside this record: it was cut off ({err.msg})",
                                                  name, index) from None
                        raise DataFormatError(f"invalid JSON: {err.msg} (line {err.lineno} col {err.colno} "
                                              f"of the current chunk)", name, index) from None
                # Incomplete element: append the next chunk and parse it again from its start.
                if not more():
                    continue
            text_len = end - pos
            byte_len = text_len if buffer_is_ascii else len(buffer[pos:end].encode("utf-8", "surrogateescape"))
            start_bytes = pos_bytes
            pos = end
            pos_bytes += byte_len
            yield ArrayElement(index, start_bytes, pos_bytes, value)
            index += 1
            expect_value = False
            # Drop the consumed prefix so the buffer does not grow with the file.
            if pos > chunk_chars:
                buffer = buffer[pos:]
                pos = 0


def read_json_records(path: str | os.PathLike) -> Iterator[dict]:
    """Streams the records of a JSON-array file (validating that each is an object)."""
    for element in iter_json_array(path):
        if not isinstance(element.value, dict):
            raise DataFormatError(f"expected a JSON object, got {type(element.value).__name__}", path,
                                  element.index)
        yield element.value


class JsonArrayWriter:
    """Writes records one by one as a JSON array (UTF-8, one record per line)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file = open(self.path, "w", encoding="utf-8")
        self._file.write("[")
        self.count = 0

    def write(self, record: Mapping[str, Any]) -> None:
        self._file.write(("\n" if self.count == 0 else ",\n") + json.dumps(record, ensure_ascii=False))
        self.count += 1

    def close(self) -> None:
        if not self._file.closed:
            self._file.write("\n]\n")
            self._file.close()

    def __enter__(self) -> "JsonArrayWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------
# Record validation.


def check_record(record: Any, spec: TaskSpec) -> Optional[tuple[str, str]]:
    """Returns (reason, message) when a record cannot be used for `spec`, else None.

    Checks structure only; molecules are checked when they are featurised.
    """
    if not isinstance(record, dict):
        return REASON_MALFORMED, f"expected a JSON object, got {type(record).__name__}"
    for field in REQUIRED_FIELDS + spec.extra_fields:
        if field not in record or record[field] is None:
            return REASON_MISSING_FIELD, f"field {field!r} is missing"
    if not spec.question_pool and not isinstance(record["instruction"], str):
        return REASON_WRONG_TYPE, f"'instruction' must be a string, got {type(record['instruction']).__name__}"
    if not isinstance(record["input"], str):
        return REASON_WRONG_TYPE, f"'input' must be a string, got {type(record['input']).__name__}"
    output = record["output"]
    if spec.output_type == OUTPUT_NUMBER:
        if isinstance(output, bool) or not isinstance(output, (int, float, str)):
            return REASON_WRONG_TYPE, f"'output' must be a number, got {type(output).__name__}"
        if isinstance(output, str):
            try:
                float(output)
            except ValueError:
                return (REASON_WRONG_TYPE if output.strip() else REASON_EMPTY_ANSWER,
                        f"'output' must be a number, got {output[:40]!r}")
    elif not isinstance(output, str):
        return REASON_WRONG_TYPE, f"'output' must be a string, got {type(output).__name__}"
    elif not output.strip():
        return REASON_EMPTY_ANSWER, "'output' is empty"
    if spec.output_type == OUTPUT_SELFIES and "[" not in output:
        return REASON_WRONG_TYPE, f"'output' is not a SELFIES string: {output[:40]!r}"
    if "extracted_molecules" in spec.extra_fields and not isinstance(record["extracted_molecules"], dict):
        return REASON_WRONG_TYPE, "'extracted_molecules' must be an object {SMILES: '$n$'}"
    metadata = record.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        return REASON_WRONG_TYPE, "'metadata' must be an object"
    return None


def record_split(record: Any) -> Optional[str]:
    metadata = record.get("metadata") if isinstance(record, dict) else None
    return metadata.get("split") if isinstance(metadata, dict) else None


def record_metadata_task(record: Any) -> Optional[str]:
    metadata = record.get("metadata") if isinstance(record, dict) else None
    return metadata.get("task") if isinstance(metadata, dict) else None


# --------------------------------------------------------------------------------------------------
# Locating task files.


def find_task_file(data_dir: str | os.PathLike, task: str, layout: str = LAYOUT_OMNIMOL) -> tuple[Path, Optional[str]]:
    """The file holding `task` in `data_dir`, and the metadata.task value to filter it by (None: no filter).

    omnimol layout, in order: `<task>.json` (our per-task convention); the current release's name for the task
    (docs/omnimol.md §8, e.g. `Molecular_Weight.json`, `IUPAC2SELFIES.json`; case-insensitive); else the one `*.json`
    whose name contains the older releases' substring (e.g. 'molcap_train', '3d_moit', with the metadata.task
    filter); several candidates are an error unless exactly one is named `<substring>.json`. mol_instructions
    layout: the Mol-Instructions file name, found in `data_dir` or `data_dir/Molecule-oriented_Instructions`.
    A task with no file raises FileNotFoundError listing the names looked for and the files that are there.
    """
    spec = get_task(task)
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data directory not found: {data_dir}")
    if layout == LAYOUT_MOL_INSTRUCTIONS:
        if spec.mol_instructions_file is None:
            raise FileNotFoundError(f"task {task!r} is not part of Mol-Instructions")
        for folder in (data_dir, data_dir / "Molecule-oriented_Instructions"):
            candidate = folder / spec.mol_instructions_file
            if candidate.is_file():
                return candidate, None
        raise FileNotFoundError(f"{spec.mol_instructions_file} not found in {data_dir} "
                                f"(or its Molecule-oriented_Instructions folder)")
    if layout != LAYOUT_OMNIMOL:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    own = data_dir / f"{task}.json"
    if own.is_file():
        return own, None
    present = sorted(p.name for p in data_dir.glob("*.json"))
    if spec.release_name:
        current = [name for name in present if name.lower() == f"{spec.release_name.lower()}.json"]
        if len(current) == 1:
            return data_dir / current[0], None
        if len(current) > 1:
            raise FileNotFoundError(f"several files for task {task!r} in {data_dir}: {current}; keep one")
    names = [name for name in present if spec.release_file_key in name]
    if not names:
        looked_for = [f"{task}.json"] + ([f"{spec.release_name}.json"] if spec.release_name else []) \
            + [f"*{spec.release_file_key}*.json"]
        raise FileNotFoundError(f"no file for task {task!r} in {data_dir}: looked for {', '.join(looked_for)}; "
                                f"the folder has {', '.join(present) if present else 'no .json files'}")
    if len(names) > 1:
        exact = [n for n in names if n == f"{spec.release_file_key}.json"]
        if len(exact) != 1:
            raise FileNotFoundError(f"several files for task {task!r} in {data_dir}: {names}; "
                                    f"keep one or name it {task}.json")
        names = exact
    return data_dir / names[0], spec.release_metadata_task


def available_tasks(data_dir: str | os.PathLike, layout: str = LAYOUT_OMNIMOL) -> list[str]:
    """Tasks for which `find_task_file` finds a file."""
    found = []
    for key in TASK_KEYS:
        try:
            find_task_file(data_dir, key, layout)
        except FileNotFoundError:
            continue
        found.append(key)
    return found


# --------------------------------------------------------------------------------------------------
# Random access to the records of one task and split.


class TaskRecords:
    """The records of one task and split in one file: offsets kept in memory, records read on demand.

    `__getitem__(i)` returns the record dict; `record_index(i)` its index in the file's array (for error
    messages). Picklable (the descriptor is reopened lazily in each process, after checking that the file is
    still the one indexed), so Grain workers can use it. A record that is not a JSON object is still indexed
    (it is rejected, and counted, when used). With `strict=False` a file that is cut off or malformed part-way
    keeps the records before the damage (`damage` says what and where, and a warning is logged).
    """

    def __init__(self, path: str | os.PathLike, task: str, split: Optional[str], metadata_task: Optional[str] = None,
                 strict: bool = True):
        self.path = str(path)
        self.task = task
        self.split = split
        self.metadata_task = metadata_task
        self.damage: Optional[str] = None
        try:
            self._fd: Optional[int] = os.open(self.path, os.O_RDONLY)
        except OSError as err:
            raise DataFormatError(f"cannot open: {err.strerror}", self.path) from None
        self._identity = _identity(os.fstat(self._fd))
        starts, ends, indices = array.array("q"), array.array("q"), array.array("q")
        self.num_in_file = 0
        self.num_without_split = 0
        try:
            # Through /dev/fd (Linux): the index describes exactly the file the descriptor reads.
            indexed = f"/dev/fd/{self._fd}" if os.path.isdir("/dev/fd") else self.path
            for element in iter_json_array(indexed, name=self.path):
                self.num_in_file += 1
                value = element.value
                if split is not None:
                    value_split = record_split(value)
                    if value_split is None:
                        self.num_without_split += 1
                    if value_split != split:
                        continue
                if metadata_task is not None and record_metadata_task(value) != metadata_task:
                    continue
                starts.append(element.byte_start)
                ends.append(element.byte_end)
                indices.append(element.index)
        except DataFormatError as err:
            if strict:
                raise
            self.damage = str(err)
            logger.warning("%s; training uses the %d records before the damage (data.strict=false)", err,
                           self.num_in_file)
        self._starts = np.frombuffer(starts, dtype=np.int64).copy()
        self._ends = np.frombuffer(ends, dtype=np.int64).copy()
        self._indices = np.frombuffer(indices, dtype=np.int64).copy()

    def __len__(self) -> int:
        return len(self._starts)

    def _descriptor(self) -> int:
        if self._fd is None:  # unpickled in a worker: the path must still name the file that was indexed
            fd = os.open(self.path, os.O_RDONLY)
            if _identity(os.fstat(fd)) != self._identity:
                os.close(fd)
                raise DataFormatError("the file was replaced or changed after it was indexed; restart the run",
                                      self.path)
            self._fd = fd
        return self._fd

    def record_index(self, i: int) -> int:
        return int(self._indices[i])

    def raw(self, i: int) -> bytes:
        start, end = int(self._starts[i]), int(self._ends[i])
        data = os.pread(self._descriptor(), end - start, start)
        if len(data) != end - start:
            raise DataFormatError(f"the file shrank after it was indexed (record ends at byte {end}, only "
                                  f"{start + len(data)} bytes left); it was changed in place, restart the run",
                                  self.path, self.record_index(i))
        return data

    def __getitem__(self, i: int) -> Any:
        if not -len(self) <= i < len(self):
            raise IndexError(f"record {i} out of range for {len(self)} records of {self.task}/{self.split}")
        return json.loads(self.raw(int(i)))

    def __iter__(self) -> Iterator[Any]:
        for i in range(len(self)):
            yield self[i]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fd"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def __del__(self, _close=os.close) -> None:  # bound early: at interpreter exit `os` may already be gone
        if getattr(self, "_fd", None) is not None:
            try:
                _close(self._fd)
            except OSError:
                pass

    def __repr__(self) -> str:
        return f"TaskRecords({self.path!r}, task={self.task!r}, split={self.split!r}, n={len(self)})"


def _identity(stat: os.stat_result) -> tuple[int, int, int, int]:
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


def open_task(data_dir: str | os.PathLike, task: str, split: Optional[str] = "train",
              layout: str = LAYOUT_OMNIMOL, strict: bool = True) -> TaskRecords:
    """The records of `task` and `split` (None: all) found in `data_dir` under the layout's file names."""
    path, metadata_task = find_task_file(data_dir, task, layout)
    return TaskRecords(path, task, split, metadata_task, strict=strict)


def open_tasks(data_dir: str | os.PathLike, tasks: Sequence[str], split: Optional[str] = "train",
               layout: str = LAYOUT_OMNIMOL, strict: bool = True) -> dict[str, TaskRecords]:
    """`open_task` for several tasks; a file shared by several tasks is still indexed once per task."""
    return {task: open_task(data_dir, task, split, layout, strict) for task in tasks}

"""The two kinds of error a user can meet, and how the command line shows them.

`InputError`: what the user gave is wrong (a config key, a data file, a record, a checkpoint folder, flags);
the command exits 2. `RunError`: the input was fine but the work could not finish (no checkpoint restores,
the run directory is in use, the disk filled up); the command exits 1. Library errors derive from one of the
two (and from ValueError / RuntimeError, so existing `except ValueError` code keeps working). Messages name the
file, record or key and what is wrong.

`describe(error)` turns any exception into one line and an exit code: operating-system errors anywhere in the
exception's cause chain (Orbax wraps them) become "disk full" / "permission denied" with the path.
"""
from __future__ import annotations

import errno
import os
import re
from typing import Optional

EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2


class OmnimolError(Exception):
    exit_code = EXIT_FAILURE


class InputError(OmnimolError, ValueError):
    """The user's input (config, files, records, checkpoint, flags) is wrong; the message says where."""

    exit_code = EXIT_BAD_INPUT


class RunError(OmnimolError, RuntimeError):
    """The work could not be completed (the input was accepted)."""

    exit_code = EXIT_FAILURE


# Plain exceptions that mean bad input when they reach the command line.
_INPUT_TYPES = (FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError, KeyError)


def _in_chain(error: BaseException, wanted) -> Optional[BaseException]:
    """The first exception satisfying `wanted` in the cause / context chain (Orbax and Grain wrap errors)."""
    seen: set[int] = set()
    node: Optional[BaseException] = error
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        if wanted(node):
            return node
        if isinstance(node, BaseExceptionGroup):
            for inner in node.exceptions:
                found = _in_chain(inner, wanted)
                if found is not None:
                    return found
        node = node.__cause__ or node.__context__
    return None


def os_error_in_chain(error: BaseException) -> Optional[OSError]:
    """The first OSError with an errno in the exception's cause / context chain."""
    found = _in_chain(error, lambda e: isinstance(e, OSError) and e.errno is not None)
    return found if isinstance(found, OSError) else None


_TEXT_ERRNO = re.compile(r"os_error_code='?(\d+)")
_TEXT_PATH = re.compile(r'(?:file|path) "([^"]+)"')


def storage_error_message(error: BaseException) -> Optional[str]:
    """'disk full ...' / 'permission denied ...' when an OS error anywhere in the chain is one an operator must act
    on. TensorStore (under Orbax) reports them as ValueError text with an `os_error_code`, which is read too."""
    found = os_error_in_chain(error)
    if found is not None:
        return os_error_message(found)
    text = _in_chain(error, lambda e: bool(_TEXT_ERRNO.search(str(e))))
    if text is None:
        return None
    code = int(_TEXT_ERRNO.search(str(text)).group(1))
    path = _TEXT_PATH.search(str(text))
    return os_error_message(OSError(code, os.strerror(code), path.group(1) if path else None))


def os_error_message(error: OSError) -> Optional[str]:
    """'disk full ...' / 'permission denied ...' for the errors an operator must act on, else None."""
    path = error.filename or ""
    where = f" writing {path}" if path else ""
    if error.errno == errno.ENOSPC:
        return f"disk full{where} (no space left on device)"
    if error.errno == errno.EDQUOT:
        return f"disk quota exceeded{where}"
    if error.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied: {path or error.strerror}"
    if error.errno == errno.EROFS:
        return f"read-only file system: {path or error.strerror}"
    return None


def one_line(text: str, limit: int = 1500) -> str:
    """A multi-line message joined with '; ' (one line on stderr), shortened to `limit` characters."""
    parts = [part.strip() for part in str(text).splitlines() if part.strip()]
    line = "; ".join(parts)
    return line if len(line) <= limit else line[:limit - 3] + "..."


def describe(error: BaseException) -> tuple[str, int, bool]:
    """(one-line message, exit code, expected) for an exception that reached the command line; `expected` is
    False for errors no check anticipated (worth a traceback, with --debug)."""
    ours = _in_chain(error, lambda e: isinstance(e, OmnimolError))
    if isinstance(ours, OmnimolError):
        return one_line(str(ours)), ours.exit_code, True
    storage = storage_error_message(error)
    if storage:
        return one_line(storage), EXIT_FAILURE, True
    if isinstance(error, KeyError):  # str(KeyError) quotes its argument
        return one_line(str(error.args[0]) if error.args else "missing key"), EXIT_BAD_INPUT, True
    if isinstance(error, _INPUT_TYPES):
        return one_line(str(error)), EXIT_BAD_INPUT, True
    if isinstance(error, OSError):
        return one_line(f"{error.strerror or error}: {error.filename or ''}".rstrip(": ")), EXIT_FAILURE, True
    return one_line(f"{type(error).__name__}: {error}"), EXIT_FAILURE, False

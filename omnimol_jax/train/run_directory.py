"""A training run's output directory: one writer at a time, and nothing left behind by a run that wrote nothing.

The lock is an advisory `flock` (the `filelock` package) on `<output_dir>/.omnimol-run.lock`, held for the whole
run by process 0. The kernel drops it when the process dies, however it dies, so a stale lock can never block
a rerun. Beside it, `.omnimol-run.owner.json` says who holds it (host, pid, start time, command) for the refusal
message. Other processes of a multi-host run share process 0's lock. (flock is local to a host on some network
file systems: two hosts started on one NFS run directory are not detected.)
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Optional

import filelock

from omnimol_jax.errors import InputError, RunError

LOCK_FILE = ".omnimol-run.lock"
OWNER_FILE = ".omnimol-run.owner.json"


class RunDirectoryBusy(RunError):
    """Another live process is writing to the run directory."""


class RunDirectory:
    def __init__(self, path: str | os.PathLike, primary: bool = True):
        self.path = Path(path)
        self.primary = primary
        self.created: Optional[Path] = None  # the topmost directory this run created, if any
        self._lock: Optional[filelock.BaseFileLock] = None

    def acquire(self) -> "RunDirectory":
        """Creates the directory if needed and takes the lock; RunDirectoryBusy names the holder."""
        missing = [p for p in (self.path, *self.path.absolute().parents) if not p.exists()]
        self.created = missing[-1] if missing else None
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise InputError(f"train.output_dir {self.path} exists and is not a directory") from None
        except OSError as err:
            raise InputError(f"train.output_dir: cannot create {self.path}: {err.strerror}") from None
        if not self.path.is_dir():
            raise InputError(f"train.output_dir {self.path} exists and is not a directory")
        if not os.access(self.path, os.W_OK):
            raise InputError(f"train.output_dir {self.path} is not writable")
        if not self.primary:
            return self
        lock = filelock.FileLock(str(self.path / LOCK_FILE), timeout=0)
        try:
            lock.acquire()
        except filelock.Timeout:
            raise RunDirectoryBusy(f"{self.path} is in use by another training run ({self._holder()}); wait for "
                                   "it to finish or stop it, or choose another train.output_dir") from None
        except OSError as err:
            raise InputError(f"train.output_dir {self.path}: cannot write the run lock: {err.strerror}") from None
        self._lock = lock
        owner = {"host": socket.gethostname(), "pid": os.getpid(),
                 "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                 "command": " ".join(sys.argv)}
        (self.path / OWNER_FILE).write_text(json.dumps(owner) + "\n")
        return self

    def _holder(self) -> str:
        try:
            owner = json.loads((self.path / OWNER_FILE).read_text())
            return f"pid {owner['pid']} on {owner['host']}, started {owner['started']}"
        except (OSError, ValueError, KeyError):
            return "holder unknown"

    def release(self, failed: bool = False) -> None:
        """Drops the lock. A failed run that created the directory and wrote nothing into it removes it."""
        if self._lock is None:
            return
        (self.path / OWNER_FILE).unlink(missing_ok=True)
        self._lock.release()
        self._lock = None
        if failed and self.created is not None:
            left = [p for p in self.path.iterdir() if p.name not in (LOCK_FILE, OWNER_FILE)]
            if not left:
                shutil.rmtree(self.created, ignore_errors=True)

    def __enter__(self) -> "RunDirectory":
        return self.acquire()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release(failed=exc_type is not None)

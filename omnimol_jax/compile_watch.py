"""How many programs XLA compiled during a piece of work, and for how long (jax.monitoring's compile events).

`omnimol eval` reports it, so that a reader sees what share of an evaluation went to compiling rather than to
generating; a persistent-cache hit is not a compile and is not counted.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from typing import Optional

import jax

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@dataclasses.dataclass
class CompileWatch:
    """Counts backend compiles between `start()` and `stop()` (usable as a context manager)."""

    compiles: int = 0
    compile_s: float = 0.0
    wall_s: float = 0.0
    _started: Optional[float] = None
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    def _listener(self, event: str, duration: float, **_) -> None:
        if event == BACKEND_COMPILE_EVENT and self._started is not None:
            with self._lock:
                self.compiles += 1
                self.compile_s += duration

    def start(self) -> "CompileWatch":
        self._started = time.perf_counter()
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def stop(self) -> "CompileWatch":
        if self._started is not None:
            jax.monitoring.unregister_event_duration_listener(self._listener)
            self.wall_s = time.perf_counter() - self._started
            self._started = None
        return self

    def __enter__(self) -> "CompileWatch":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def share(self) -> float:
        return self.compile_s / self.wall_s if self.wall_s > 0 else 0.0

    def summary(self) -> str:
        return (f"{self.compiles} program(s) compiled in {self.compile_s:.1f} s, {100 * self.share:.0f}% of "
                f"{self.wall_s:.1f} s")

"""How many programs XLA compiled during a piece of work, and how long getting programs took (jax.monitoring's
compile events).

`omnimol eval` reports it, so that a reader sees what share of an evaluation went to compiling rather than to
generating. The time counts tracing to a jaxpr, lowering to StableHLO and XLA's compile: a persistent-cache hit
still traces and lowers (that is how its key is found), so it costs that much, but it is not counted as a compile.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from typing import Optional

import jax

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
LOWER_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"


@dataclasses.dataclass
class CompileWatch:
    """Counts backend compiles, and times them with their tracing and lowering, between `start()` and `stop()`
    (usable as a context manager). `traces` counts programs traced: every program jit did not already hold, whether
    XLA then compiled it or the persistent cache had it (so a test of "no new program" holds on a warm cache too)."""

    compiles: int = 0
    traces: int = 0
    compile_s: float = 0.0  # trace + lower + XLA compile
    wall_s: float = 0.0
    _started: Optional[float] = None
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    def _listener(self, event: str, duration: float, **_) -> None:
        if self._started is None or event not in (BACKEND_COMPILE_EVENT, TRACE_EVENT, LOWER_EVENT):
            return
        with self._lock:
            self.compiles += event == BACKEND_COMPILE_EVENT
            self.traces += event == TRACE_EVENT
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
        return (f"{self.compiles} program(s) compiled; tracing, lowering and compiling took {self.compile_s:.1f} s, "
                f"{100 * self.share:.0f}% of {self.wall_s:.1f} s")

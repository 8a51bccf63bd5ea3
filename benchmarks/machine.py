"""The `machine` block every benchmark prints (what ran the numbers; libraries already imported only),
`pin_threads`, which puts both frameworks of a comparison on the same cores, and `interleaved`, which times them
taking turns."""
from __future__ import annotations

import os
import platform
import sys
import time
from typing import Any, Callable


def describe_machine(**extra) -> dict:
    info = {"cpus": os.cpu_count(), "python": platform.python_version()}
    if "numpy" in sys.modules:
        info["numpy"] = sys.modules["numpy"].__version__
    if "jax" in sys.modules:
        jax = sys.modules["jax"]
        info.update(jax=jax.__version__, device=str(jax.devices()[0]))
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    return {**info, **extra}


def pin_threads(threads: int) -> str:
    """Both frameworks on the same cores: the process's CPU affinity (XLA sizes its pool from it when its backend
    starts, so call this before the first jax computation) and torch's intra-op thread count. 0: all cores."""
    if threads <= 0:
        return f"all {os.cpu_count()} cpus"
    if hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))[:threads]
        os.sched_setaffinity(0, set(cores))
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    return f"pinned to {threads} core(s)"


def interleaved(runs: dict[str, Callable[[], Any]], iters: int, loops: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each run over `iters` rounds in which the runs take turns, so that all of them see the
    same background load of a shared machine; a round's time is the mean of `loops` calls. A jax result returned
    by a run is waited for after its round's last call (so jax may queue the calls of a round, as a loop would)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(iters):
        for name, run in runs.items():
            start = time.perf_counter()
            for _ in range(loops):
                out = run()
            if hasattr(out, "block_until_ready"):
                out.block_until_ready()
            times[name].append((time.perf_counter() - start) / loops)
    return times

"""FLOP accounting for MFU: XLA's cost analysis of the compiled step over the device's peak FLOP/s."""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from omnimol_jax import loops
from omnimol_jax.sharding import use_mesh

# Dense bf16 peak FLOP/s per device (vendor figures).
KNOWN_PEAKS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12,
    "TPU v6e": 918e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12,
    "NVIDIA B200": 2250e12,
}


def compiled_flops(compiled: Any) -> float:
    """FLOPs of one call of a compiled computation (per device) as XLA counts them (loops once), 0 if it gives none."""
    return _cost(compiled.cost_analysis(), "flops")


def _cost(analysis: Any, key: str) -> float:
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get(key, 0.0))


def step_costs(compiled: Any, lowered: Any, fn: Callable, *args: Any) -> tuple[float, float]:
    """(FLOPs, bytes accessed) of one call of `compiled` (per device), with its loops counted in full.

    XLA counts a loop body once, so when the step has loops (scanned layers, loss chunks, accumulated micro-batches)
    the compiled figures are scaled by how much `fn`'s fully unrolled lowering (traced afresh, analysed, never
    compiled) exceeds its looped lowering: both before optimisation and partitioning, so fusion and the device
    count cancel out of the ratio. A backend without an analysis of lowered programs (a TPU topology described
    from a CPU host) has both lowered again for this host, from the arguments' shapes alone.
    """
    analysis = compiled.cost_analysis()
    flops, bytes_accessed = _cost(analysis, "flops"), _cost(analysis, "bytes accessed")
    if "stablehlo.while" not in lowered.as_text():
        return flops, bytes_accessed
    looped, host = _lowered_cost(lowered), contextlib.nullcontext()
    if looped is None:
        args, host = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args), use_mesh(None)
        with use_mesh(None):
            looped = _lowered_cost(jax.jit(lambda *a: fn(*a)).lower(*args))
    with loops.unrolled_for_costing(), host:
        full = _lowered_cost(jax.jit(lambda *a: fn(*a)).lower(*args))  # a new function: not from jit's trace cache
    if not looped or not full:
        return flops, bytes_accessed
    scale = lambda key: full.get(key, 0.0) / max(looped.get(key, 0.0), 1.0)  # noqa: E731
    return flops * scale("flops"), bytes_accessed * scale("bytes accessed")


def _lowered_cost(lowered: Any) -> Optional[dict]:
    try:
        analysis = lowered.cost_analysis()
    except Exception:  # noqa: BLE001 - backends without an analysis of unoptimised programs raise their own errors
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    return dict(analysis) if analysis and analysis.get("flops") else None


def measure_matmul_peak(size: int = 2048, dtype=jnp.float32, repeats: int = 5) -> float:
    """Achieved FLOP/s of a large jitted matmul on the default device: the practical peak on CPUs."""
    a = jnp.ones((size, size), dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size ** 3 / best


def device_peak_flops(override: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s per device, where the figure comes from)."""
    if override > 0:
        return override, "config"
    kind = jax.devices()[0].device_kind
    for name, peak in KNOWN_PEAKS.items():
        if kind.startswith(name):
            return peak, f"table ({kind})"
    return measure_matmul_peak(), f"measured fp32 matmul ({kind})"

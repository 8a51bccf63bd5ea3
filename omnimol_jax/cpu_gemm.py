"""XLA:CPU's matrix-multiply back-end for the `omnimol` program: oneDNN, where it was measured faster.

benchmarks/gemm_backends.py times the demo train step with each back-end, interleaved: oneDNN (`--xla_cpu_use_onednn`)
1.36x the default Eigen dots, XNNPACK 0.92x, identical losses; on SmolLM2-135M's step (30 layers, hidden 576) oneDNN
and the default tie. So the `omnimol` program adds `--xla_cpu_use_onednn=true` to XLA_FLAGS before jax starts,
unless the user's XLA_FLAGS already choose (any `--xla_cpu_use_onednn` / `--xla_cpu_use_xnnpack`) or
`OMNIMOL_GEMM=default` keeps XLA's own. The flag is read by the CPU back-end only; accelerators ignore it.
"""
from __future__ import annotations

import os
from typing import MutableMapping

SWITCH = "OMNIMOL_GEMM"  # onednn (default) | default
ONEDNN_FLAG = "--xla_cpu_use_onednn=true"


def apply(env: MutableMapping[str, str] = os.environ) -> str:
    """Sets the back-end in `env`'s XLA_FLAGS (call before jax initialises); returns the one in effect."""
    flags = env.get("XLA_FLAGS", "")
    if "--xla_cpu_use_onednn" in flags or "--xla_cpu_use_xnnpack" in flags:
        return "as XLA_FLAGS set it"
    if env.get(SWITCH, "onednn").strip().lower() in ("default", "eigen", "off", "0", "none"):
        return "XLA default"
    env["XLA_FLAGS"] = f"{flags} {ONEDNN_FLAG}".strip()
    return "oneDNN"


def in_effect(env: MutableMapping[str, str] = os.environ) -> str:
    """Which back-end this process's XLA_FLAGS chose (for `omnimol info`)."""
    flags = env.get("XLA_FLAGS", "")
    if "--xla_cpu_use_onednn=true" in flags:
        return "oneDNN"
    if "--xla_cpu_use_xnnpack=true" in flags:
        return "XNNPACK"
    return "XLA default"

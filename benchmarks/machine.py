"""The `machine` block every benchmark prints: what ran the numbers (libraries already imported only)."""
from __future__ import annotations

import os
import platform
import sys


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

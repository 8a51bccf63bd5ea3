"""Several processes (hosts of a pod, or processes on one machine): starting jax's distributed runtime from the
environment, and waiting for each other."""
from __future__ import annotations

import os

ENVIRONMENT = (("coordinator_address", "JAX_COORDINATOR_ADDRESS"), ("num_processes", "JAX_NUM_PROCESSES"),
               ("process_id", "JAX_PROCESS_ID"))


def initialize_distributed() -> None:
    """jax.distributed.initialize() with what JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID give;
    without them jax detects the cluster itself (TPU pods, SLURM, Kubernetes)."""
    import jax

    explicit = {key: os.environ[name] for key, name in ENVIRONMENT if name in os.environ}
    for key in ("num_processes", "process_id"):
        if key in explicit:
            explicit[key] = int(explicit[key])
    jax.distributed.initialize(**explicit)


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (a no-op in a single process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)

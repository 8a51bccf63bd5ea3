"""Devices to compile for without owning them: TPU slices described by libtpu, or fake CPU devices.

Names: Cloud TPU slice names (`v5p-16`, `v5e-256`, `v6e-64`, `v4-32`; v4/v5p count TensorCores, two per chip,
v5e/v6e count chips), libtpu topology strings (`v5e:4x4`, `v5p:2x2x2`), or `cpu:N` (N host devices; XLA_FLAGS must
give them before jax starts, which `omnimol compile` does). A TPU name needs libtpu (`pip install 'omnimol-jax[tpu]'`)
and must divide into whole hosts (libtpu rejects `v5e:1x1`).

Per-chip figures (vendor specifications) give the HBM budget and the roofline: dense bf16 peak FLOP/s and HBM
bandwidth.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Optional

from omnimol_jax.errors import InputError

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: int
    peak_flops: float          # dense bf16 FLOP/s per chip
    hbm_bandwidth: float       # bytes/s per chip
    cores_per_chip: int        # TensorCores counted by the slice name
    dims: int                  # torus dimensions of the topology string


CHIPS = {
    "v4": Chip("TPU v4", 32 * GIB, 275e12, 1228e9, 2, 3),
    "v5e": Chip("TPU v5e", 16 * GIB, 197e12, 819e9, 1, 2),
    "v5p": Chip("TPU v5p", 95 * GIB, 459e12, 2765e9, 2, 3),
    "v6e": Chip("TPU v6e", 32 * GIB, 918e12, 1640e9, 1, 2),
}
# Chip counts -> torus shape, as Cloud TPU lays out slices of each generation.
SHAPES_2D = {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
             512: "8x8x8"}


class TopologyError(InputError):
    """A topology name that cannot be resolved, or one whose compiler is not installed."""


@dataclasses.dataclass
class Target:
    """Devices to compile for and what one of them offers."""

    name: str
    platform: str
    devices: list
    hbm_bytes: int
    peak_flops: float
    hbm_bandwidth: float
    device_kind: str

    @property
    def num_hosts(self) -> int:
        return len({getattr(d, "process_index", 0) for d in self.devices})


def tpu_topology_string(name: str) -> tuple[str, str]:
    """('v5e', '4x4') from 'v5e-16' or 'v5e:4x4'."""
    text = name.strip().lower().replace("v5litepod", "v5e").replace("v6litepod", "v6e")
    match = re.fullmatch(r"(v4|v5e|v5p|v6e)[:](\d+(?:x\d+){1,2})", text)
    if match:
        return match.group(1), match.group(2)
    match = re.fullmatch(r"(v4|v5e|v5p|v6e)-(\d+)", text)
    if not match:
        raise TopologyError(f"unknown topology {name!r}: use a slice name (v5p-16, v5e-256, v6e-64, v4-32), a "
                            "topology (v5e:4x4, v5p:2x2x2) or cpu:N")
    generation, count = match.group(1), int(match.group(2))
    chip = CHIPS[generation]
    chips, rest = divmod(count, chip.cores_per_chip)
    shapes = SHAPES_3D if chip.dims == 3 else SHAPES_2D
    if rest or chips not in shapes:
        sizes = sorted(n * chip.cores_per_chip for n in shapes)
        raise TopologyError(f"topology {name!r}: {generation} slices come in sizes {sizes}; or give the torus "
                            f"shape, e.g. {generation}:{next(iter(shapes.values()))}")
    return generation, shapes[chips]


def _host_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def resolve(name: str) -> Target:
    """The devices of `name` (see the module docstring)."""
    import jax

    if name.startswith("cpu:"):
        try:
            count = int(name[4:])
        except ValueError:
            raise TopologyError(f"topology {name!r}: cpu:N takes a device count, e.g. cpu:8") from None
        devices = jax.devices("cpu")
        if count < 1 or len(devices) < count:
            raise TopologyError(f"topology {name!r}: this process has {len(devices)} CPU device(s); start it with "
                                f"XLA_FLAGS=--xla_force_host_platform_device_count={count} (omnimol compile does)")
        from omnimol_jax.train.flops import measure_matmul_peak

        peak = measure_matmul_peak(size=1024, repeats=3)
        return Target(name, "cpu", list(devices[:count]), _host_memory_bytes() // count, peak, 20e9,
                      devices[0].device_kind)
    generation, shape = tpu_topology_string(name)
    try:
        import libtpu  # noqa: F401  (the TPU compiler; jax finds it by this module)
    except ImportError:
        raise TopologyError(f"compiling for {name} needs the TPU compiler (libtpu): pip install 'omnimol-jax[tpu]' "
                            "(or pip install 'jax[tpu]')") from None
    # Describing a slice does not touch a TPU: let it run beside a job (or another compile) that holds libtpu.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    try:
        description = topologies.get_topology_desc(f"{generation}:{shape}", platform="tpu")
    except Exception as err:  # libtpu reports bad shapes with several exception types
        raise TopologyError(f"topology {name!r} ({generation}:{shape}): libtpu cannot describe it: "
                            f"{str(err).splitlines()[0]}") from None
    chip = CHIPS[generation]
    devices = list(description.devices)
    return Target(name, "tpu", devices, chip.hbm_bytes, chip.peak_flops, chip.hbm_bandwidth,
                  getattr(devices[0], "device_kind", chip.name))


def cpu_device_flag(name: str, environ: Optional[dict[str, Any]] = None) -> Optional[str]:
    """The XLA_FLAGS value that gives a fresh process the devices of `cpu:N` (None for other names)."""
    if not name.startswith("cpu:"):
        return None
    environ = os.environ if environ is None else environ
    flags = [f for f in environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform")]
    return " ".join(flags + [f"--xla_force_host_platform_device_count={name[4:]}"])

"""Device mesh and the one table that maps logical axis names to mesh axes.

Model code names logical axes only: parameters carry `logical_axes=(...)` metadata and activations go
through `constrain(x, (...))`. This module is the only place that turns those names into
`PartitionSpec`s over the mesh axes (data, fsdp, tensor, expert).
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import math
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from omnimol_jax.config import ConfigError, MeshConfig

logger = logging.getLogger(__name__)

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor", "expert")

# Logical axis name -> mesh axis (or axes, or None = replicated). Parameters first, then activations.
# Batch-like activation axes are split over every axis that does not split weights' compute, so the expert
# axis doubles as data parallelism outside the expert layers.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # --- parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("expert", "expert"),
    ("lora_rank", None),
    ("scalar", None),
    ("gin_embed", None),
    ("gin_hidden", None),
    ("gin_vocab", None),
    ("projector_in", None),
    ("layers", None),  # the stacking axis of scanned layers' weights
    # --- activations
    ("activation_batch", ("data", "fsdp", "expert")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_head_dim", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("activation_expert", "expert"),
    ("activation_nodes", None),
    # --- KV cache
    ("cache_batch", ("data", "fsdp", "expert")),
    ("cache_length", None),
    ("cache_kv_heads", "tensor"),
    ("cache_head_dim", None),
)
_RULES = dict(LOGICAL_AXIS_RULES)

_active_mesh: contextvars.ContextVar[Optional[Mesh]] = contextvars.ContextVar("omnimol_mesh", default=None)


def build_mesh(config: MeshConfig, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A mesh with axes (data, fsdp, tensor, expert); a size of -1 takes the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [config.data, config.fsdp, config.tensor, config.expert]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ConfigError(f"mesh {_sizes_text(sizes)}: {len(devices)} device(s) are not divisible by the fixed "
                              f"axes' product {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ConfigError(f"mesh {_sizes_text(sizes)} needs {math.prod(sizes)} devices, but "
                          f"{len(devices)} {'is' if len(devices) == 1 else 'are'} available")
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def _sizes_text(sizes: Sequence[int]) -> str:
    return ",".join(f"{axis}={size}" for axis, size in zip(MESH_AXES, sizes))


def logical_to_spec(logical_axes: Sequence[Optional[str]], shape: Optional[Sequence[int]] = None,
                    mesh: Optional[Mesh] = None) -> PartitionSpec:
    """Maps logical names to a PartitionSpec via LOGICAL_AXIS_RULES.

    With `shape` and `mesh`, mesh axes of size 1 are left out and a dimension that the mesh axes do not
    divide is replicated instead (e.g. 2 KV heads on a tensor axis of 4), so every config runs on every mesh.
    """
    spec: list[Any] = []
    used: set[str] = set()
    for dim, name in enumerate(logical_axes):
        if name is None:
            spec.append(None)
            continue
        if name not in _RULES:
            raise KeyError(f"logical axis {name!r} has no rule in omnimol_jax.sharding.LOGICAL_AXIS_RULES")
        target = _RULES[name]
        axes = [] if target is None else ([target] if isinstance(target, str) else list(target))
        axes = [a for a in axes if a not in used]  # a mesh axis may split only one dimension
        if mesh is not None:
            axes = [a for a in axes if mesh.shape[a] > 1]
            if shape is not None:
                while axes and shape[dim] % math.prod(mesh.shape[a] for a in axes):
                    axes.pop()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*spec)


def named_sharding(mesh: Mesh, logical_axes: Sequence[Optional[str]],
                   shape: Optional[Sequence[int]] = None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, shape, mesh))


def _variable_logical_axes(variable: nnx.Variable) -> Optional[tuple]:
    return variable.get_metadata().get("logical_axes")


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """NamedShardings for an nnx State (abstract or concrete) from each Variable's `logical_axes`.

    Variables without logical axes (counters, RNG state) are replicated.
    """
    def one(variable):
        value = variable.get_value() if hasattr(variable, "get_value") else variable.value
        axes = _variable_logical_axes(variable)
        if axes is None:
            return variable.replace(NamedSharding(mesh, PartitionSpec()))
        if len(axes) != len(value.shape):
            raise ValueError(f"logical_axes {axes} do not match the shape {value.shape} of a "
                             f"{type(variable).__name__}")
        return variable.replace(named_sharding(mesh, axes, value.shape))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_sharded_model(constructor: Callable[[], nnx.Module], mesh: Mesh) -> nnx.Module:
    """Builds a module whose parameters are created directly in their shards (no host-side full copy).

    `constructor` must be deterministic (seeded inside) and take no arguments.
    """
    abstract = nnx.eval_shape(constructor)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh)

    def init():
        return nnx.state(constructor())

    with use_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def shard_module(module: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Moves an existing module's state onto the mesh according to its logical axes."""
    graphdef, state = nnx.split(module)
    state = jax.device_put(state, state_shardings(state, mesh))
    return nnx.merge(graphdef, state)


@contextlib.contextmanager
def use_mesh(mesh: Optional[Mesh]) -> Iterator[Optional[Mesh]]:
    """Activates `mesh` for `constrain` (and for jax) while tracing code that runs on it."""
    token = _active_mesh.set(mesh)
    try:
        if mesh is None:
            yield mesh
        else:
            with jax.set_mesh(mesh):
                yield mesh
    finally:
        _active_mesh.reset(token)


def active_platform() -> str:
    """The platform code is being traced for: the active mesh's devices (a TPU slice compiled ahead of time from a
    CPU host says 'tpu'), else jax's default backend."""
    mesh = _active_mesh.get()
    return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()


def constrain(x: jax.Array, logical_axes: Sequence[Optional[str]]) -> jax.Array:
    """Sharding constraint on an activation by logical names; a no-op outside `use_mesh`."""
    mesh = _active_mesh.get()
    if mesh is None or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, logical_axes, x.shape))


def per_shard(fn: Callable[..., jax.Array], args: Sequence[jax.Array], logical_axes: Sequence[Sequence[Optional[str]]],
              out_axes: Sequence[Optional[str]], split_alike: Sequence[Sequence[str]] = ()) -> jax.Array:
    """fn(*args) run on each device's shard (jax.shard_map over the active mesh, by logical names), for code whose
    work depends on the data of each shard (a lax.cond per batch row, say) and so must not be partitioned by XLA.

    fn itself outside `use_mesh` or on one device. A logical axis is split only where every argument naming it splits
    it the same way, and each group of names in `split_alike` is split alike or not at all (query heads and KV heads:
    8 and 2 on a tensor axis of 4 would leave a shard pairing the wrong query groups with its keys)."""
    mesh = _active_mesh.get()
    if mesh is None or mesh.size == 1:
        return fn(*args)
    specs = [list(logical_to_spec(axes, x.shape, mesh)) for axes, x in zip(logical_axes, args)]
    chosen: dict[str, Any] = {}  # logical name -> the mesh axes that split it in every argument, or None
    for axes, spec in zip(logical_axes, specs):
        for name, entry in zip(axes, spec):
            if name is not None and chosen.setdefault(name, entry) != entry:
                chosen[name] = None
    for group in split_alike:
        if len({repr(chosen.get(n)) for n in group if n in chosen}) > 1:
            chosen.update({n: None for n in group})
    in_specs = tuple(PartitionSpec(*(chosen[n] if n is not None else None for n in axes)) for axes in logical_axes)
    out_spec = PartitionSpec(*(chosen.get(n) if n is not None else None for n in out_axes))
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_spec, check_vma=False)(*args)


def batch_shard_count(mesh: Mesh) -> int:
    """Devices a [batch, ...] array is split over (the product of the mesh axes of `activation_batch`)."""
    spec = logical_to_spec(("activation_batch",), mesh=mesh)[0]
    axes = () if spec is None else ((spec,) if isinstance(spec, str) else tuple(spec))
    return math.prod(mesh.shape[a] for a in axes)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a [batch, ...] input array: batch over the data-parallel axes, the rest replicated."""
    return named_sharding(mesh, ("activation_batch",) + (None,) * (ndim - 1))

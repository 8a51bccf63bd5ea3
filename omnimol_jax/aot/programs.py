"""Ahead-of-time compilation of a run's programs for devices this host does not have (`omnimol compile`).

As MaxText's train_compile: the config's mesh is built over the target's devices (a TPU slice described by libtpu,
or fake CPU devices), every parameter, optimizer slot and batch array is an abstract `ShapeDtypeStruct` with the
sharding the trainer would give it, and the real jitted train step (shardings, donation, remat as configured) and
the generation program are lowered and compiled. Nothing is allocated. XLA's memory and cost analyses then say,
per device, whether the program fits the chip's memory and what the roofline allows.
"""
from __future__ import annotations

import dataclasses
import re
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from omnimol_jax import tasks
from omnimol_jax.aot.topology import Target
from omnimol_jax.config import BatchGeometry, Config, batch_geometry
from omnimol_jax.constants import NUM_ATOM_FEATURES, NUM_BOND_FEATURES
from omnimol_jax.data.loader import leaf_sharding, model_batch
from omnimol_jax.data.packing import BatchAssembler, single_sample_row
from omnimol_jax.inference.decoding import GenerationConfig, Generator, build_prompt_batch
from omnimol_jax.model import splash
from omnimol_jax.model.build import omnimol_constructor
from omnimol_jax.sharding import batch_shard_count, batch_sharding, build_mesh, state_shardings, use_mesh
from omnimol_jax.train.flops import step_costs
from omnimol_jax.train.program import run_train_program

DTYPE_BYTES = re.compile(r"\b(pred|s8|u8|s16|u16|f16|bf16|s32|u32|f32|s64|u64|f64)\[([\d,]*)\]")
BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
         "s64": 8, "u64": 8, "f64": 8}


@dataclasses.dataclass
class ProgramReport:
    """One compiled program, per device."""

    name: str
    compile_s: float
    argument_bytes: int
    output_bytes: int
    alias_bytes: int           # outputs written into donated arguments (not counted twice)
    temp_bytes: int
    code_bytes: int
    flops: float
    bytes_accessed: float
    hbm_bytes: int
    peak_flops: float
    hbm_bandwidth: float
    largest_temporaries: list[str]
    compiler_error: str = ""   # the TPU compiler refuses a program that exceeds HBM: its message
    # Pallas kernels (splash attention on TPU) are opaque to XLA's cost analysis: their analytic count, included in
    # flops and bytes_accessed above
    kernel_flops: float = 0.0
    kernel_bytes: float = 0.0

    @property
    def total_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

    @property
    def fits(self) -> bool:
        return not self.compiler_error and self.total_bytes <= self.hbm_bytes

    @property
    def step_time_bound_s(self) -> float:
        """The roofline: the step takes at least its FLOPs at peak and at least its bytes at full bandwidth."""
        return max(self.flops / self.peak_flops, self.bytes_accessed / self.hbm_bandwidth)

    @property
    def bound_by(self) -> str:
        return "compute" if self.flops / self.peak_flops >= self.bytes_accessed / self.hbm_bandwidth else "memory"

    @property
    def mfu_bound(self) -> float:
        """The MFU the roofline allows: XLA's FLOPs over peak x the bound (at most 1)."""
        bound = self.step_time_bound_s
        return self.flops / (self.peak_flops * bound) if bound > 0 else 0.0

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(total_bytes=self.total_bytes, fits=self.fits, step_time_bound_s=self.step_time_bound_s,
                   bound_by=self.bound_by, mfu_bound=round(self.mfu_bound, 4),
                   arithmetic_intensity=self.flops / max(self.bytes_accessed, 1.0),
                   ridge_point=self.peak_flops / self.hbm_bandwidth)
        return out


def _analysis(compiled) -> tuple[dict, Any]:
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) and cost else cost) or {}
    return cost, compiled.memory_analysis()


def largest_temporaries(compiled, count: int = 5) -> list[str]:
    """The biggest arrays the optimized program writes (from its HLO text; best effort): 'shape op_name'. The
    bodies of fusions are skipped: their values live in registers or VMEM, only a fusion's output is a buffer."""
    try:
        text = compiled.as_text()
    except Exception:  # noqa: BLE001 - some backends cannot print the optimized program
        return []
    found: dict[str, int] = {}
    in_fusion_body = False
    for raw in text.splitlines():
        if raw and not raw[0].isspace() and raw.rstrip().endswith("{"):  # a computation's header
            name = raw.split()[1 if raw.startswith("ENTRY") else 0].lstrip("%")
            in_fusion_body = name.startswith("fused_") or ".fused_" in name or name.startswith("fusion")
            continue
        line = raw.strip()
        if in_fusion_body or " = " not in line or line.startswith(("ROOT", "//")) or "parameter(" in line:
            continue
        head = line.split(" = ", 1)[1]
        match = DTYPE_BYTES.match(head)
        if not match:
            continue
        dims = [int(d) for d in match.group(2).split(",") if d]
        size = BYTES[match.group(1)] * int(np.prod(dims, dtype=np.int64))
        name = re.search(r'op_name="([^"]+)"', line)
        label = f"{match.group(1)}[{match.group(2)}] {name.group(1) if name else head.split('(')[0]}"
        found[label] = max(found.get(label, 0), size)
    top = sorted(found.items(), key=lambda kv: -kv[1])[:count]
    return [f"{size / 2 ** 20:.1f} MiB {label}" for label, size in top]


SIZE = re.compile(r"([\d.]+)\s*([KMGT]?)i?B?\)")
OUT_OF_MEMORY = ("RESOURCE_EXHAUSTED", "Ran out of memory")


def _compile(lowered):
    """(compiled, None), or (None, message) when the compiler refuses the program for its memory (TPU does)."""
    try:
        return lowered.compile(), None
    except Exception as err:  # noqa: BLE001 - jaxlib raises its own runtime error type
        message = str(err)
        if not any(marker in message for marker in OUT_OF_MEMORY):
            raise
        return None, " ".join(message.split())[:400]


def _refused(name: str, message: str, compile_s: float, target: Target) -> ProgramReport:
    """A program the compiler refused: the temporaries it asked for, as its message states them."""
    sizes = [float(v) * {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}[u]
             for v, u in SIZE.findall(message)]
    return ProgramReport(name=name, compile_s=round(compile_s, 2), argument_bytes=0, output_bytes=0, alias_bytes=0,
                         temp_bytes=int(sizes[0]) if sizes else 0, code_bytes=0, flops=0.0, bytes_accessed=0.0,
                         hbm_bytes=target.hbm_bytes, peak_flops=target.peak_flops,
                         hbm_bandwidth=target.hbm_bandwidth, largest_temporaries=[], compiler_error=message)


def _report(name: str, compiled, compile_s: float, target: Target,
            costs: Optional[tuple[float, float]] = None) -> ProgramReport:
    """The compiled program's memory and costs; `costs` (FLOPs, bytes) replace XLA's when given (loops counted)."""
    cost, memory = _analysis(compiled)
    flops, bytes_accessed = costs or (float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0)))
    return ProgramReport(
        name=name, compile_s=round(compile_s, 2),
        argument_bytes=int(getattr(memory, "argument_size_in_bytes", 0)),
        output_bytes=int(getattr(memory, "output_size_in_bytes", 0)),
        alias_bytes=int(getattr(memory, "alias_size_in_bytes", 0)),
        temp_bytes=int(getattr(memory, "temp_size_in_bytes", 0)),
        code_bytes=int(getattr(memory, "generated_code_size_in_bytes", 0)),
        flops=flops, bytes_accessed=bytes_accessed,
        hbm_bytes=target.hbm_bytes, peak_flops=target.peak_flops, hbm_bandwidth=target.hbm_bandwidth,
        largest_temporaries=largest_temporaries(compiled))


def num_tasks(config: Config) -> int:
    """Tasks of the config's list, "all" counted as every task the registry knows (no data folder is read)."""
    return len(tasks.resolve_task_list(tasks.parse_task_list(config.data.tasks, config.data.mixture,
                                                             key="data.tasks"), lambda: tasks.TASK_KEYS))


def target_geometry(config: Config, target: Target) -> BatchGeometry:
    """data.global_batch_size on the target: rows per host and per device (ConfigError if it does not divide)."""
    return batch_geometry(config, target.num_hosts, batch_shard_count(build_mesh(config.mesh, target.devices)))


def host_batch(config: Config, rows: int) -> dict:
    """One host batch of `rows` rows of the configured shapes (what the pipeline hands the step), from empty rows."""
    data, mode = config.data, config.graph.feature_mode
    sample = {"input_ids": np.zeros(1, np.int32), "labels": np.zeros(1, np.int32), "task_id": np.zeros(1, np.int32),
              "node_features": np.zeros((0, NUM_ATOM_FEATURES[mode]), np.int32),
              "edge_index": np.zeros((0, 2), np.int32), "edge_features": np.zeros((0, NUM_BOND_FEATURES[mode]),
                                                                                  np.int32)}
    row = single_sample_row(sample, data.seq_len, data.row_nodes, data.row_edges, pad_id=0)
    row["task_id"] = np.zeros(data.segments_per_row, np.int32)
    row["task_id_segment_ids"] = (np.arange(data.segments_per_row) == 0).astype(np.int32)
    return model_batch(BatchAssembler(rows, data.segments_per_row, 0)([row] * rows))


def abstract_micro_batches(config: Config, mesh, num_hosts: int) -> Any:
    """[grad_accum, global batch, ...] abstract arrays with the loader's shardings (batch axis split)."""
    accum = config.train.grad_accum_steps
    data_sharding = batch_sharding(mesh)

    def abstract(array):
        array = np.asarray(array)
        global_shape = (array.shape[0] * num_hosts,) + array.shape[1:]
        inner = leaf_sharding(data_sharding, np.empty(global_shape, array.dtype), 1)
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, *tuple(inner.spec)))
        return jax.ShapeDtypeStruct((accum,) + global_shape, array.dtype, sharding=sharding)

    rows = batch_geometry(config, num_hosts, 1).process_rows
    return jax.tree.map(abstract, host_batch(config, rows))


def _with_shardings(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def compile_train_step(config: Config, target: Target) -> ProgramReport:
    """Lowers and compiles the trainer's jitted step for `target` (see the module docstring)."""
    mesh = build_mesh(config.mesh, target.devices)
    abstract_model = nnx.eval_shape(omnimol_constructor(config.model, config.graph, seed=config.seed))
    graphdef, abstract_state = nnx.split(abstract_model)
    model = nnx.merge(graphdef, _with_shardings(abstract_state, state_shardings(abstract_state, mesh)))
    program = run_train_program(model, config, num_tasks(config))
    state, frozen = program.abstract_state(mesh), program.frozen
    batches = abstract_micro_batches(config, mesh, target.num_hosts)
    train_step = program.jitted_train_step(state)
    start = time.perf_counter()
    with use_mesh(mesh):
        lowered = train_step.lower(state, frozen, batches)
        compiled, refused = _compile(lowered)
    seconds = time.perf_counter() - start
    if refused:
        return _refused("train_step", refused, seconds, target)
    # the loops (scanned layers, loss chunks, micro-batches) counted in full; outside the target's mesh, since a
    # TPU target's costs are counted on lowerings for this host
    flops, bytes_accessed = step_costs(compiled, lowered, train_step.__wrapped__, state, frozen, batches)
    kernel_flops, kernel_bytes = kernel_costs(config, target)
    report = _report("train_step", compiled, seconds, target, (flops + kernel_flops, bytes_accessed + kernel_bytes))
    return dataclasses.replace(report, kernel_flops=kernel_flops, kernel_bytes=kernel_bytes)


def kernel_costs(config: Config, target: Target) -> tuple[float, float]:
    """Per device, what XLA's analysis cannot see: the splash kernel compiled by Mosaic for a TPU (on CPU it runs
    in interpret mode as XLA ops, which the analysis counts). Work divides evenly over the devices."""
    model = config.model
    if model.attention_impl != "splash" or target.platform != "tpu":
        return 0.0, 0.0
    flops, bytes_accessed = splash.train_costs(
        config.data.global_batch_size, config.data.seq_len, model.num_heads, model.num_kv_heads, model.head_dim,
        model.num_layers, model.splash_block_q, model.splash_block_kv, jnp.dtype(model.dtype).itemsize)
    return flops / len(target.devices), bytes_accessed / len(target.devices)


def compile_generation(config: Config, target: Target, rows: int, prompt_len: int, new_tokens: int
                       ) -> ProgramReport:
    """The greedy generation program (prefill of a left-padded prompt batch + the decode loop) for `target`."""
    mesh = build_mesh(config.mesh, target.devices)
    abstract_model = nnx.eval_shape(omnimol_constructor(config.model, config.graph, seed=config.seed))
    pad = config.model.pad_token_id or 0
    generator = Generator(abstract_model, pad_token_id=pad, stop_token_ids=[config.model.eos_token_id or 1],
                          mesh=mesh)
    # as `omnimol eval` runs it: a graph batch sized by the token shape (here empty; the shapes are what count)
    batch = build_prompt_batch([[1] * prompt_len] * rows, None, pad_token_id=pad, bucket=prompt_len,
                               graph_feature_widths=generator.graph_feature_widths)
    program, args = generator.program_for(batch, GenerationConfig(max_new_tokens=new_tokens))
    start = time.perf_counter()
    with use_mesh(mesh):
        compiled, refused = _compile(program.lower(*args))
    seconds = time.perf_counter() - start
    if refused:
        return _refused("generate", refused, seconds, target)
    return _report("generate", compiled, seconds, target)


def report_table(target: Target, reports: list[ProgramReport]) -> str:
    gib = 2 ** 30
    lines = [f"target {target.name}: {len(target.devices)} x {target.device_kind} ({target.num_hosts} host(s)), "
             f"{target.hbm_bytes / gib:.1f} GiB per device, peak {target.peak_flops / 1e12:.3g} TFLOP/s, "
             f"{target.hbm_bandwidth / 1e9:.0f} GB/s"]
    for r in reports:
        if r.compiler_error:
            lines += [f"{r.name}: DOES NOT FIT - the compiler refused it after {r.compile_s:.0f} s: "
                      f"{r.compiler_error}"]
            continue
        lines += [
            f"{r.name}: {'FITS' if r.fits else 'DOES NOT FIT'} - {r.total_bytes / gib:.2f} of "
            f"{r.hbm_bytes / gib:.1f} GiB per device (compiled in {r.compile_s:.1f} s)",
            f"  arguments {r.argument_bytes / gib:.2f} GiB, outputs {r.output_bytes / gib:.2f} GiB "
            f"(aliased {r.alias_bytes / gib:.2f}), temporaries {r.temp_bytes / gib:.2f} GiB, code "
            f"{r.code_bytes / 2 ** 20:.1f} MiB",
            f"  {r.flops / 1e12:.3f} TFLOP and {r.bytes_accessed / 1e9:.2f} GB accessed per step and device "
            f"({r.flops / max(r.bytes_accessed, 1):.0f} FLOP/byte, ridge {r.peak_flops / r.hbm_bandwidth:.0f})",
            f"  step time >= {r.step_time_bound_s * 1e3:.1f} ms ({r.bound_by}-bound); MFU bound {r.mfu_bound:.2f}"]
        if r.kernel_flops:
            lines.append(f"  of which the splash kernel, counted analytically (XLA does not see inside Pallas): "
                         f"{r.kernel_flops / 1e12:.3f} TFLOP, {r.kernel_bytes / 1e9:.2f} GB")
        if r.largest_temporaries:
            lines.append("  largest temporaries: " + "; ".join(r.largest_temporaries[:3]))
    return "\n".join(lines)


def compile_run(config: Config, target: Target, programs: tuple[str, ...] = ("train", "generate"),
                prompt_len: Optional[int] = None, new_tokens: int = 64) -> list[ProgramReport]:
    reports = []
    if "train" in programs:
        reports.append(compile_train_step(config, target))
    if "generate" in programs:
        rows = batch_geometry(config, target.num_hosts, 1).micro_batch_rows
        reports.append(compile_generation(config, target, rows, prompt_len or min(config.data.seq_len, 512),
                                          new_tokens))
    return reports

"""What `data.global_batch_size` means on a given topology: rows per optimizer step over all processes, split into
`train.grad_accum_steps` micro-batches, each divided evenly among the processes and then over the devices of the
mesh's batch axes. A config therefore means the same run on one host or on a pod: only rows per process and per
device change with the topology (as Levanter's `train_batch_size`; MaxText counts per device instead).
"""
from __future__ import annotations

import dataclasses

from omnimol_jax.config.sections import ConfigError


@dataclasses.dataclass(frozen=True)
class BatchGeometry:
    global_rows: int       # rows per optimizer step, all processes and micro-batches together
    grad_accum_steps: int  # micro-batches per optimizer step
    processes: int         # data-loading processes (hosts)
    batch_shards: int      # devices the batch axis is split over (the mesh's data x fsdp x expert)
    seq_len: int           # tokens per row

    def __post_init__(self) -> None:
        micro, rest = divmod(self.global_rows, self.grad_accum_steps)
        if rest:
            raise ConfigError(f"data.global_batch_size: {self.global_rows} rows do not divide into "
                              f"train.grad_accum_steps={self.grad_accum_steps} micro-batches")
        if micro % self.processes:
            raise ConfigError(f"data.global_batch_size: a micro-batch of {micro} rows (global {self.global_rows} / "
                              f"{self.grad_accum_steps} accumulation steps) does not divide over {self.processes} "
                              "processes")

    @property
    def micro_batch_rows(self) -> int:
        """Rows of one micro-batch over all processes: the leading dimension the train step sees."""
        return self.global_rows // self.grad_accum_steps

    @property
    def process_rows(self) -> int:
        """Rows of one micro-batch that one process loads (the pipeline's batch)."""
        return self.micro_batch_rows // self.processes

    @property
    def device_rows(self) -> float:
        """Rows of one micro-batch per device of the batch axes (fractional if they do not divide: replicated)."""
        return self.micro_batch_rows / self.batch_shards

    @property
    def tokens_per_step(self) -> int:
        return self.global_rows * self.seq_len

    def to_dict(self) -> dict:
        return dict(dataclasses.asdict(self), micro_batch_rows=self.micro_batch_rows, process_rows=self.process_rows,
                    device_rows=self.device_rows, tokens_per_step=self.tokens_per_step)

    def describe(self) -> str:
        device = f"{self.device_rows:g}"
        return (f"global batch {self.global_rows} rows x {self.seq_len} tokens = {self.tokens_per_step:,} tokens per "
                f"optimizer step; {self.grad_accum_steps} micro-batch(es) of {self.micro_batch_rows} rows, "
                f"{self.process_rows} rows per process ({self.processes} process(es)), {device} rows per device "
                f"({self.batch_shards} batch shard(s))")


def batch_geometry(config, processes: int, batch_shards: int) -> BatchGeometry:
    """The geometry of a run config (`Config`) on `processes` hosts with `batch_shards` devices on the batch axes."""
    return BatchGeometry(config.data.global_batch_size, config.train.grad_accum_steps, processes, batch_shards,
                         config.data.seq_len)


def process_batch_rows(global_rows: int, grad_accum_steps: int, processes: int) -> int:
    """Rows per micro-batch on one process; ConfigError when the global batch does not divide."""
    return BatchGeometry(global_rows, grad_accum_steps, processes, 1, 1).process_rows

"""The Grain training pipeline: task mixture -> samples -> fixed-shape batches -> devices.

Stages (MapDataset until the per-sample transform, IterDataset after it), each in its own module:

1. One source per task (`readers.TaskRecords`, random access by byte offset).
2. `mixture`: the stream of (task, record) pairs, shuffled per epoch (`permutation`) and sharded by process.
3. `samples`: per sample, in Grain worker threads/processes, the record becomes token ids, labels and a graph;
   a bad record becomes a `rejections.Rejection` (counted per task and reason; `strict` raises instead).
4. `packing` / `bucketing`: fixed-shape batches, `pack` (first-fit packing of several samples per row),
   `bucket` (a few static row lengths) or `pad` (one sample per row); one padded graph batch per batch.
5. `loader`: device placement with a batch sharding, prefetch in a thread, exact checkpointable state.
"""
from __future__ import annotations

import collections
import json
from typing import Any, Callable, Mapping, Optional

import grain
from tqdm.auto import tqdm

from omnimol_jax import tasks
from omnimol_jax.config import ConfigError, DataConfig, process_batch_rows
from omnimol_jax.constants import FEATURE_MODES
from omnimol_jax.data import molecules, readers
from omnimol_jax.data.bucketing import BucketBatchesIterDataset
from omnimol_jax.data.featurize import FeaturizationError, MolGraph
from omnimol_jax.data.loader import DataIterator
from omnimol_jax.data.mixture import mixture_dataset, process_shard
from omnimol_jax.data.packing import BatchAssembler, SingleSampleRow, packed_rows
from omnimol_jax.data.rejections import AcceptedIterDataset
from omnimol_jax.data.samples import SampleBuilder
from omnimol_jax.data.tokenizer import ChatTokenizer, load_chat_tokenizer
from omnimol_jax.errors import InputError

# Records checked per task, in file order, for a usable one before training (all of them with data.strict).
USABLE_RECORD_SEARCH = 1000


class EmptyTaskError(InputError):
    """Every checked record of a task is unusable: training would silently leave the task out."""


class Pipeline:
    """Builds the Grain dataset for a DataConfig; `iterator()` gives a DataIterator."""

    def __init__(self, config: DataConfig, tokenizer: Optional[ChatTokenizer] = None,
                 sources: Optional[Mapping[str, readers.TaskRecords]] = None, *,
                 feature_mode: str = FEATURE_MODES[0], grad_accum_steps: int = 1):
        config.validate()
        if feature_mode not in FEATURE_MODES:
            raise ConfigError(f"graph.feature_mode: {feature_mode!r} is not one of {FEATURE_MODES}")
        self.config = config
        self.feature_mode = feature_mode  # graph.feature_mode of the run config
        self.tokenizer = tokenizer or load_chat_tokenizer(config.tokenizer_path(), double_bos=config.double_bos,
                                                          chat_format=config.chat_format)
        available = ((lambda: readers.available_tasks(config.data_dir, config.layout)) if sources is None
                     else (lambda: list(sources)))
        entries = tasks.resolve_task_list(tasks.parse_task_list(config.tasks, config.mixture, key="data.tasks"),
                                          available)
        if not entries:
            raise readers.DataFormatError(f"data.data_dir: no task files in {config.data_dir} "
                                          f"({config.layout} layout)")
        self.task_keys = [name for name, _ in entries]
        self.values = [float(value) for _, value in entries]
        if sources is None:
            sources = readers.open_tasks(config.data_dir, self.task_keys, config.split, config.layout,
                                         strict=config.strict)
        missing = [k for k in self.task_keys if k not in sources]
        if missing:
            raise readers.DataFormatError(f"data.tasks: no task file for {missing} in {config.data_dir}")
        self.sources = [sources[k] for k in self.task_keys]
        for key, source in zip(self.task_keys, self.sources):
            if len(source) == 0:
                raise readers.DataFormatError(f"{source.path}: task {key!r} has no {config.split!r} records"
                                 + (f" ({source.num_without_split} records have no metadata.split)"
                                    if source.num_without_split else ""))
        self.process = process_shard(config)
        # rows of each batch this process yields: one micro-batch's share of data.global_batch_size
        self.batch_rows = process_batch_rows(config.global_batch_size, grad_accum_steps, self.process[1])
        self.builder = SampleBuilder(self.task_keys, self.sources, self.tokenizer, config, feature_mode)
        self.dataset = self._build()

    @property
    def task_sizes(self) -> dict[str, int]:
        return {k: len(s) for k, s in zip(self.task_keys, self.sources)}

    def index_dataset(self) -> grain.MapDataset:
        """(task index, record index, stream position) for this process, before the per-sample transform."""
        index, count = self.process
        dataset = mixture_dataset([len(s) for s in self.sources], self.values, self.config)
        return dataset[index::count] if count > 1 else dataset

    def sample_dataset(self) -> grain.IterDataset:
        """Accepted samples for this process (rejections ride along, see rejections.AcceptedIterDataset)."""
        config = self.config
        dataset = self.index_dataset().map(self.builder)
        iterable = dataset.to_iter_dataset(grain.ReadOptions(num_threads=max(1, config.num_threads),
                                                             prefetch_buffer_size=max(16, 4 * self.batch_rows)))
        if config.num_workers > 0:
            from absl import (
                flags,  # Grain's worker processes read absl flags, which a non-absl program never parses
            )

            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.num_workers))
        return AcceptedIterDataset(iterable, config.max_consecutive_rejections)

    def _build(self) -> grain.IterDataset:
        config = self.config
        samples = self.sample_dataset()
        rows = self.batch_rows
        assembler = BatchAssembler(rows, config.segments_per_row, self.tokenizer.pad_id)
        if config.batching == "pack":
            return packed_rows(samples, config, self.tokenizer.pad_id, rows).batch(
                rows, drop_remainder=False, batch_fn=assembler)
        if config.batching == "bucket":
            return BucketBatchesIterDataset(samples, config, self.tokenizer.pad_id, rows).map(assembler)
        padded = samples.map(SingleSampleRow(config.seq_len, config.row_nodes, config.row_edges,
                                           self.tokenizer.pad_id))
        return padded.batch(rows, drop_remainder=False, batch_fn=assembler)

    def iterator(self, batch_sharding: Any = None) -> DataIterator:
        return DataIterator(self, batch_sharding)

    def check_records(self, say: Callable[[str], None] = print, progress: bool = False) -> None:
        """Before anything is compiled: with data.strict, every record of every task must become a sample (the
        first that does not raises its RecordError); otherwise each task needs a usable record among its first
        USABLE_RECORD_SEARCH, or EmptyTaskError names the task and why (unless data.allow_empty_tasks)."""
        strict = self.config.strict
        total = sum(len(s) for s in self.sources) if strict else 0
        bar = tqdm(total=total, desc="checking records", unit="record", disable=not (strict and progress))
        try:
            for task_index, (key, source) in enumerate(zip(self.task_keys, self.sources)):
                reasons: collections.Counter[str] = collections.Counter()
                example = ""
                limit = len(source) if strict else min(len(source), USABLE_RECORD_SEARCH)
                for record_index in range(limit):
                    try:
                        self.builder.build(task_index, record_index)
                    except readers.RecordError as err:
                        if strict:
                            raise
                        reasons[err.reason] += 1
                        example = example or str(err)
                        continue
                    finally:
                        bar.update(1 if strict else 0)
                    if not strict:
                        break
                else:
                    if strict or limit == 0:
                        continue
                    what = "every record" if limit == len(source) else f"the first {limit} records"
                    message = (f"task {key!r}: {what} of {source.path} ({self.config.split} split) are unusable "
                               f"({', '.join(f'{r}: {n}' for r, n in reasons.most_common())}), e.g. {example}")
                    if not self.config.allow_empty_tasks:
                        raise EmptyTaskError(f"{message}; fix the data or the limits (data.seq_len, "
                                             "data.nodes_per_row), drop the task from data.tasks, or set "
                                             "data.allow_empty_tasks=true")
                    say(f"warning: {message}; training on (data.allow_empty_tasks)")
        finally:
            bar.close()
        if strict:
            say(f"data.strict: all {total} records of {len(self.task_keys)} tasks are usable")

    def calibration_graphs(self, max_graphs: int = 512) -> list[MolGraph]:
        """Up to `max_graphs` molecule graphs of the training split, for setting a random graph tower's batch-norm
        statistics: the graph tasks' records taken round-robin in file order, records training would reject (bad,
        or over the row's token or atom budget) skipped. The same on every process and in every run, and it
        leaves the sample stream (and so exact resume) untouched."""
        graph_tasks = [(task_index, spec, source) for task_index, (spec, source)
                       in enumerate(zip(self.builder.specs, self.sources)) if spec.has_graph]
        order = sorted((index, task) for task, (_, _, source) in enumerate(graph_tasks)
                       for index in range(len(source)))
        graphs: list[MolGraph] = []
        for index, task in order:
            if len(graphs) == max_graphs:
                break
            task_index, spec, source = graph_tasks[task]
            try:
                self.builder.build(task_index, index)  # RecordError: training skips this record
                record = source[index]
                graph = molecules.graph_for(spec.graph_rule, record["input"], record, mode=self.feature_mode)
            except (json.JSONDecodeError, readers.RecordError, FeaturizationError):
                continue  # the sample stream reports bad records; calibration just uses the good ones
            if graph.num_nodes:
                graphs.append(graph)
        return graphs

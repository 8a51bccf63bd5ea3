"""Batches onto the devices: the one place host batches are placed on the mesh, and the checkpointable,
prefetching iterator that does it.

`DataIterator.get_state()` returns bytes (JSON) describing the position after the last batch returned, plus the
bad-record counts; `set_state` restores it exactly (usable with `grain.checkpoint.CheckpointSave/Restore`).
"""
from __future__ import annotations

import json
import math
import queue
import threading
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from omnimol_jax.data.graphs import GraphBatch
from omnimol_jax.data.rejections import BadRecordStats, find_accepted_iterator
from omnimol_jax.sharding import batch_sharding

if TYPE_CHECKING:
    from omnimol_jax.data.pipeline import Pipeline


# The arrays (besides `graphs`) a train or eval step consumes; host-only entries like rejections stay behind.
BATCH_ARRAY_KEYS = ("input_ids", "labels", "positions", "segment_ids", "attention_mask", "token_task_ids")


def model_batch(batch: dict) -> dict:
    """The arrays (and graphs) a step consumes; host-only entries like rejections are dropped."""
    out = {k: batch[k] for k in BATCH_ARRAY_KEYS}
    out["graphs"] = batch["graphs"]
    return out


def leaf_sharding(batch_sharding: Any, array: np.ndarray, process_count: int) -> Any:
    """The batch sharding's split of dim 0 applied to an array of any rank (replicated if indivisible on a
    single process)."""
    spec = tuple(batch_sharding.spec)
    first = spec[0] if spec else None
    mesh = batch_sharding.mesh
    axes = () if first is None else (first,) if isinstance(first, str) else tuple(first)
    shards = math.prod(mesh.shape[a] for a in axes)
    if array.ndim == 0 or array.shape[0] * process_count % shards:
        if process_count > 1:
            raise ValueError(f"array of shape {array.shape} cannot be split {shards} ways over the batch axes")
        return NamedSharding(mesh, PartitionSpec())
    return NamedSharding(mesh, PartitionSpec(first, *([None] * (array.ndim - 1))))



def globalize_graph_indices(graphs: GraphBatch, batch_size: int, process_index: int) -> GraphBatch:
    """Offsets a process-local graph batch so that concatenating all processes' arrays along dim 0 gives a
    consistent global batch (node indices shifted by this process's node block, rows by its row block)."""
    nodes = graphs.node_sample_index.shape[0]
    node_offset = process_index * nodes
    row_offset = process_index * batch_size
    g = graphs.graphs
    return GraphBatch(
        graphs=g._replace(senders=g.senders + node_offset, receivers=g.receivers + node_offset),
        node_sample_index=np.where(graphs.node_sample_index >= 0, graphs.node_sample_index + row_offset, -1)
        .astype(np.int32),
        graph_sample_index=np.where(graphs.graph_sample_index >= 0, graphs.graph_sample_index + row_offset, -1)
        .astype(np.int32))


def place_batch(batch: dict, data_sharding: Any, *, process_index: int = 0, process_count: int = 1,
                batch_size: Optional[int] = None) -> dict:
    """Puts a host batch on devices: every array is split along dim 0 like the batch sharding (graph arrays
    too; with several processes their indices are made global first)."""
    if process_count > 1:
        batch = dict(batch, graphs=globalize_graph_indices(batch["graphs"], batch_size or batch["input_ids"].shape[0],
                                                           process_index))
    return _put(batch, data_sharding, process_count, batch_axis=0)


def place_micro_batches(batches: Sequence[dict], mesh, *, process_index: int = 0, process_count: int = 1) -> dict:
    """Stacks host micro-batches on a new leading axis (replicated) and shards their batch axis (axis 1)."""
    batches = [model_batch(b) for b in batches]
    if process_count > 1:
        rows = batches[0]["input_ids"].shape[0]
        batches = [dict(b, graphs=globalize_graph_indices(b["graphs"], rows, process_index)) for b in batches]
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *batches)
    return _put(stacked, batch_sharding(mesh), process_count, batch_axis=1)


def _put(tree: Any, data_sharding: Any, process_count: int, batch_axis: int) -> Any:
    """Every leaf split along `batch_axis` like the data sharding; with several processes each gives its block."""
    def put(array: np.ndarray) -> jax.Array:
        inner = leaf_sharding(data_sharding, array[(0,) * batch_axis], process_count)
        sharding = NamedSharding(data_sharding.mesh, PartitionSpec(*([None] * batch_axis), *tuple(inner.spec)))
        if process_count > 1:
            global_shape = list(array.shape)
            global_shape[batch_axis] *= process_count
            return jax.make_array_from_process_local_data(sharding, array, tuple(global_shape))
        return jax.device_put(array, sharding)

    return jax.tree.map(put, tree)


class DataIterator:
    """Batches of the pipeline (on devices when a batch sharding is given), with exact checkpointing.

    `get_state()` returns bytes (JSON) describing the position after the last batch returned by `next`,
    plus the bad-record counts; `set_state(state)` restores it. Works with
    `grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)` under Orbax.
    """

    def __init__(self, pipeline: "Pipeline", batch_sharding: Any = None):
        self.pipeline = pipeline
        self.batch_sharding = batch_sharding
        self.stats = BadRecordStats(pipeline.config.max_logged_examples)
        self._iterator = pipeline.dataset.__iter__()
        self._state = self._iterator.get_state()
        self._queue: Optional[queue.Queue] = None
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self.start_prefetch()

    # -- prefetch
    def _produce(self) -> Any:
        batch = next(self._iterator)
        state = self._iterator.get_state()
        rejections = batch.pop("rejections")
        if self.batch_sharding is not None:
            index, count = self.pipeline.process
            batch = place_batch(batch, self.batch_sharding, process_index=index, process_count=count,
                                batch_size=self.pipeline.batch_rows)
        return batch, state, rejections

    def _worker(self) -> None:
        while not self._stop.is_set():
            try:
                item = ("ok", self._produce())
            except StopIteration:
                item = ("stop", None)
            except BaseException as err:  # handed to the consumer, raised there with its traceback
                item = ("error", err)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[0] != "ok":
                return

    def start_prefetch(self) -> None:
        if self.pipeline.config.prefetch_batches <= 0 or self._thread is not None:
            return
        self._stop.clear()
        self._queue = queue.Queue(maxsize=self.pipeline.config.prefetch_batches)
        self._thread = threading.Thread(target=self._worker, name="omnimol-data-prefetch", daemon=True)
        self._thread.start()

    def _stop_prefetch(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._queue = None

    # -- iteration
    def __iter__(self) -> "DataIterator":
        return self

    def _finish(self) -> None:
        """End of a finite stream: count the rejections that no accepted sample came after."""
        accepted = find_accepted_iterator(self._iterator)
        if accepted is not None:
            for rejection in accepted.take_pending():
                self.stats.add(rejection)

    def __next__(self) -> dict:
        if self._thread is None:
            try:
                batch, state, rejections = self._produce()
            except StopIteration:
                self._finish()
                raise
        else:
            kind, payload = self._queue.get()
            if kind == "stop":
                self._stop_prefetch()
                self._finish()
                raise StopIteration
            if kind == "error":
                self._stop_prefetch()
                raise payload
            batch, state, rejections = payload
        for rejection in rejections:
            self.stats.add(rejection)
        self._state = state
        return batch

    # -- checkpointing
    def state_dict(self) -> dict:
        return {"version": 1, "grain": self._state, "bad_records": self.stats.to_dict()}

    def get_state(self) -> bytes:
        return json.dumps(self.state_dict()).encode()

    def set_state(self, state: bytes | str | Mapping[str, Any]) -> None:
        if isinstance(state, (bytes, str)):
            state = json.loads(state)
        if state.get("version") != 1:
            raise ValueError(f"unknown data iterator state version {state.get('version')!r}")
        self._stop_prefetch()
        self._iterator.set_state(state["grain"])
        self._state = state["grain"]
        self.stats.load_dict(state.get("bad_records", {}))
        self.start_prefetch()

    def close(self) -> None:
        self._stop_prefetch()
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()

"""The Grain training pipeline: task mixture -> samples (tokens + graph) -> fixed-shape batches -> device.

Stages (MapDataset until the per-sample transform, IterDataset after it):

1. One source per task (`readers.TaskRecords`, random access by byte offset).
2. Mixture of the tasks, either as the public code does (`mixture="concat"`: concatenate every task, keeping a
   seeded random subset of `ratio` of each, `forward:1/retrosynthesis:0.5`) or by weights
   (`mixture="weighted"`: task t gets weight_t / sum of the weights of the stream, each task reshuffled and
   repeated on its own). Shuffled per epoch (seed combined with the epoch).
3. Sharded by JAX process: process p of P reads stream positions p, p + P, ...
4. Per sample, in Grain worker threads/processes: read the record, check it, render the prompt (SPEC.md
   section 5), featurise the graph (`molecules.graph_for`), tokenise with labels on the answer only, expand
   the `<image>` placeholder to one slot per atom (`model.splice.expand_image_placeholder`). A bad record
   becomes a rejection (counted per task and reason); `strict=True` raises naming file and record index.
5. Fixed-shape batches: `pack` (Grain first-fit packing of several samples per row: tokens, atoms and bonds
   each within the row budget), `bucket` (windowed length bucketing into a few static shapes) or `pad`
   (one sample per row, padded to `seq_len`).
6. Graph batch (`graphs.batch_graphs`: one padded jraph GraphsTuple, node -> row index), per-token task ids.
7. `DataIterator`: device placement with a batch sharding, prefetch in a thread, checkpointable state
   (`get_state`/`set_state`, usable with `grain.checkpoint.CheckpointSave/Restore`) that restores exactly.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import queue
import sys
import threading
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import grain
import numpy as np

from omnimol_jax.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER, IMAGE_TOKEN_ID
from omnimol_jax.data import molecules, readers, tasks
from omnimol_jax.data.featurize import NUM_ATOM_FEATURES, NUM_BOND_FEATURES, FeaturizationError, MolGraph
from omnimol_jax.data.graphs import GraphBatch, GraphBudget, batch_graphs
from omnimol_jax.data.tokenizer import ChatTokenizer, TokenizerError, load_chat_tokenizer
from omnimol_jax.model.splice import GraphSlotError, expand_image_placeholder

logger = logging.getLogger(__name__)

BATCHING_MODES = ("pack", "bucket", "pad")
MIXTURE_MODES = ("concat", "weighted")


@dataclasses.dataclass
class DataConfig:
    """Data pipeline settings (the `data` section of the run config)."""

    data_dir: str = "data/builtin"
    layout: str = "omnimol"  # omnimol (Omni-Mol release / built-in corpus) | mol_instructions
    # "all" (every task with a file in data_dir), "paper" (those of the paper's 16 tasks) or
    # "task[:value]/task[:value]/..."; the value is the kept fraction (concat) or the weight (weighted), default 1.
    tasks: str = "all"
    mixture: str = "concat"  # concat | weighted
    split: str = "train"
    tokenizer: str = ""  # tokenizer.json or a folder holding one; "" = <data_dir>/tokenizer
    double_bos: bool = True  # two BOS tokens as in the public code (checkpoint compatibility)
    seq_len: int = 512  # tokens per row (graph slots included)
    batch_size: int = 8  # rows per batch on this process
    batching: str = "pack"  # pack | bucket | pad
    max_samples_per_row: int = 8  # packing: samples (segments) per row
    nodes_per_row: int = 0  # atoms per row; 0 = seq_len // 4
    edges_per_row: int = 0  # directed bonds per row; 0 = 3 * nodes_per_row
    pack_window_batches: int = 8  # packing bins = batch_size * this
    bucket_boundaries: tuple[int, ...] = ()  # bucket row lengths; () = seq_len/8, /4, /2, 1 (multiples of 8)
    bucket_window_batches: int = 16  # samples sorted into buckets per window = batch_size * this
    feature_mode: str = "omnimol"  # omnimol | ogb (graph features)
    strict: bool = False  # raise on the first bad record instead of skipping it
    seed: int = 0
    shuffle: bool = True
    num_epochs: Optional[int] = None  # None: repeat forever
    num_threads: int = 2  # Grain read threads per process
    num_workers: int = 0  # Grain worker processes (0: none)
    prefetch_batches: int = 2  # batches prepared ahead by DataIterator's thread (0: no thread)
    process_index: Optional[int] = None  # None: jax.process_index()
    process_count: Optional[int] = None  # None: jax.process_count()
    molcap_drop_selfies_if_too_long: bool = True  # as the public code: retry molcap with the question only
    # Fail (naming the reasons) after this many rejected records in a row, instead of cycling forever through
    # a stream in which nothing fits (e.g. seq_len far too short).
    max_consecutive_rejections: int = 5000
    max_logged_examples: int = 3  # first bad records logged per (task, reason)

    def validate(self) -> None:
        def need(ok: bool, key: str, message: str) -> None:
            if not ok:
                raise ValueError(f"data.{key}: {message}")

        need(self.layout in readers.LAYOUTS, "layout", f"{self.layout!r} is not one of {readers.LAYOUTS}")
        need(self.mixture in MIXTURE_MODES, "mixture", f"{self.mixture!r} is not one of {MIXTURE_MODES}")
        need(self.batching in BATCHING_MODES, "batching", f"{self.batching!r} is not one of {BATCHING_MODES}")
        need(self.split in readers.SPLITS, "split", f"{self.split!r} is not one of {readers.SPLITS}")
        need(self.feature_mode in NUM_ATOM_FEATURES, "feature_mode", f"{self.feature_mode!r} is not one of "
             f"{tuple(NUM_ATOM_FEATURES)}")
        need(self.seq_len >= 16, "seq_len", f"must be >= 16, got {self.seq_len}")
        need(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        need(self.max_samples_per_row >= 1, "max_samples_per_row", "must be >= 1")
        need(self.nodes_per_row >= 0 and self.edges_per_row >= 0, "nodes_per_row", "budgets must be >= 0")
        need(self.pack_window_batches >= 1 and self.bucket_window_batches >= 1, "pack_window_batches",
             "window sizes must be >= 1")
        need(self.num_epochs is None or self.num_epochs >= 1, "num_epochs", "must be >= 1 or null")
        need(0 <= self.seed < 2 ** 31, "seed", "must be in [0, 2**31)")
        if self.process_index is not None or self.process_count is not None:
            need(self.process_index is not None and self.process_count is not None, "process_index",
                 "set both process_index and process_count, or neither")
            need(0 <= self.process_index < self.process_count, "process_index",
                 f"must be in [0, {self.process_count})")
        boundaries = list(self.bucket_boundaries)
        need(boundaries == sorted(boundaries) and all(b > 0 for b in boundaries)
             and (not boundaries or boundaries[-1] <= self.seq_len), "bucket_boundaries",
             f"must be increasing, positive and at most seq_len, got {boundaries}")
        parse_mixture(self.tasks, self.mixture)

    @property
    def row_nodes(self) -> int:
        return self.nodes_per_row or self.seq_len // 4

    @property
    def row_edges(self) -> int:
        return self.edges_per_row or 3 * self.row_nodes

    @property
    def buckets(self) -> tuple[int, ...]:
        if self.bucket_boundaries:
            boundaries = list(self.bucket_boundaries)
            return tuple(boundaries if boundaries[-1] == self.seq_len else boundaries + [self.seq_len])
        fractions = (8, 4, 2)
        found = sorted({max(8, (self.seq_len // f) // 8 * 8) for f in fractions if self.seq_len // f >= 8})
        return tuple(b for b in found if b < self.seq_len) + (self.seq_len,)

    @property
    def segments_per_row(self) -> int:
        return self.max_samples_per_row if self.batching == "pack" else 1

    def tokenizer_path(self) -> Path:
        return Path(self.tokenizer) if self.tokenizer else Path(self.data_dir) / "tokenizer"


def parse_mixture(text: str, mixture: str = "concat") -> list[tuple[str, Optional[float]]]:
    """'forward:1/retrosynthesis:0.5' -> [('forward', 1.0), ('retrosynthesis', 0.5)]; 'all' / 'paper' ->
    [('all', None)] / [('paper', None)] (resolved against the files present).

    In concat mode a value is the kept fraction, in (0, 1] (the public code subsamples, never upweights);
    in weighted mode any positive weight.
    """
    text = text.strip()
    if text in ("all", "paper"):
        return [(text, None)]
    entries = []
    for part in text.replace(",", "/").split("/"):
        part = part.strip()
        if not part:
            continue
        name, _, value = part.partition(":")
        name = name.strip()
        tasks.get_task(name)
        try:
            number = float(value) if value.strip() else 1.0
        except ValueError:
            raise ValueError(f"mixture entry {part!r}: {value!r} is not a number") from None
        if mixture == "concat" and not 0.0 < number <= 1.0:
            raise ValueError(f"mixture entry {part!r}: in concat mode a task keeps a fraction in (0, 1] of its "
                             f"records (use mixture=weighted to upweight)")
        if mixture == "weighted" and not number > 0.0:
            raise ValueError(f"mixture entry {part!r}: weights must be > 0")
        entries.append((name, number))
    if not entries:
        raise ValueError(f"no task in mixture {text!r}")
    names = [n for n, _ in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"a task appears twice in mixture {text!r}")
    return entries


# --------------------------------------------------------------------------------------------------
# Sources and mixture (index level).


class _EpochPermutations:
    """A seeded permutation of range(size) per epoch (the last few kept), so every epoch is reshuffled.

    Grain's index shuffle costs about a millisecond per element on small sets; one numpy permutation per epoch
    costs ~10 ms per million elements and 8 bytes per element while cached.
    """

    def __init__(self, size: int, seed: Sequence[int], shuffle: bool):
        self.size = size
        self.seed = list(seed)
        self.shuffle = shuffle
        self._cache: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __call__(self, index: int) -> int:
        epoch, offset = divmod(int(index), self.size)
        if not self.shuffle:
            return offset
        permutation = self._cache.get(epoch)
        if permutation is None:
            permutation = np.random.default_rng(self.seed + [epoch]).permutation(self.size)
            with self._lock:
                if len(self._cache) >= 3:
                    self._cache.pop(min(self._cache))
                self._cache[epoch] = permutation
        return int(permutation[offset])

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_cache"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


class _ConcatStream:
    """Concat mode: position -> (task index, record index); the concatenated plan reshuffled every epoch."""

    def __init__(self, task_of: np.ndarray, record_of: np.ndarray, seed: int, shuffle: bool,
                 num_epochs: Optional[int]):
        self.task_of, self.record_of = task_of, record_of
        self.order = _EpochPermutations(len(task_of), [seed, 1], shuffle)
        self.length = sys.maxsize if num_epochs is None else num_epochs * len(task_of)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[int, int]:
        j = self.order(index)
        return int(self.task_of[j]), int(self.record_of[j])


class _TaskStream:
    """Weighted mode: one task's records, repeated forever, reshuffled on every pass."""

    def __init__(self, task_index: int, size: int, seed: int, shuffle: bool):
        self.task_index = task_index
        self.order = _EpochPermutations(size, [seed, 2, task_index], shuffle)

    def __len__(self) -> int:
        return sys.maxsize

    def __getitem__(self, index: int) -> tuple[int, int]:
        return self.task_index, self.order(index)


def _attach_position(position: int, element: tuple[int, int]) -> tuple[int, int, int]:
    return element[0], element[1], int(position)


def _process_shard(config: DataConfig) -> tuple[int, int]:
    if config.process_index is not None:
        return config.process_index, config.process_count
    import jax  # local: the pipeline can be built and tested without touching jax devices

    return jax.process_index(), jax.process_count()


def mixture_dataset(sizes: Sequence[int], values: Sequence[float], config: DataConfig) -> grain.MapDataset:
    """The stream of (task index, record index, stream position), before process sharding."""
    if config.mixture == "concat":
        task_of, record_of = [], []
        for task_index, (size, ratio) in enumerate(zip(sizes, values)):
            keep = size if ratio >= 1.0 else int(round(size * ratio))
            if ratio < 1.0:  # a fixed random subset, drawn once (as the public code's random_split)
                chosen = np.sort(np.random.default_rng([config.seed, 3, task_index]).permutation(size)[:keep])
            else:
                chosen = np.arange(size)
            task_of.append(np.full(keep, task_index, np.int32))
            record_of.append(chosen.astype(np.int64))
        task_of_all, record_of_all = np.concatenate(task_of), np.concatenate(record_of)
        if len(task_of_all) == 0:
            raise ValueError("the mixture selects no records")
        dataset = grain.MapDataset.source(_ConcatStream(task_of_all, record_of_all, config.seed, config.shuffle,
                                                        config.num_epochs))
    else:
        parts = []
        for task_index, size in enumerate(sizes):
            if size == 0:
                raise ValueError(f"task #{task_index} has no records but a weight in the mixture")
            parts.append(grain.MapDataset.source(_TaskStream(task_index, size, config.seed, config.shuffle)))
        dataset = grain.MapDataset.mix(parts, weights=list(values))
        if config.num_epochs is not None:  # as many samples as num_epochs passes over all tasks
            dataset = dataset[: config.num_epochs * int(sum(sizes))]
    return dataset.map_with_index(_attach_position)


# --------------------------------------------------------------------------------------------------
# Samples.


@dataclasses.dataclass(frozen=True)
class Rejection:
    task: str
    reason: str
    path: str
    record_index: int
    message: str

    def to_list(self) -> list:
        return [self.task, self.reason, self.path, self.record_index, self.message]


class SampleBuilder:
    """(task index, record index, stream position) -> sample arrays, or {'_rejected': Rejection fields}.

    Sample: input_ids / labels int32 [L] (graph slots expanded), task_id int32 [1] (the task's index in the
    pipeline's `task_keys`), node_features int32 [N, F], edge_index int32 [E, 2] (local atom indices),
    edge_features int32 [E, Fb]. Runs in Grain workers.
    """

    def __init__(self, task_keys: Sequence[str], sources: Sequence[readers.TaskRecords], tokenizer: ChatTokenizer,
                 config: DataConfig):
        self.specs = [tasks.get_task(k) for k in task_keys]
        self.sources = list(sources)
        self.tokenizer = tokenizer
        self.config = config
        self.num_atom_features = NUM_ATOM_FEATURES[config.feature_mode]
        self.num_bond_features = NUM_BOND_FEATURES[config.feature_mode]

    def __call__(self, element: tuple[int, int, int]) -> dict:
        task_index, record_index, position = element
        spec, source = self.specs[task_index], self.sources[task_index]
        try:
            return self._build(task_index, spec, source, record_index, position)
        except readers.RecordError as err:
            if self.config.strict:
                raise
            return {"_rejected": Rejection(spec.key, err.reason, source.path, err.record_index or 0,
                                           str(err)[:300]).to_list()}

    def _fail(self, spec: tasks.TaskSpec, source: readers.TaskRecords, record_index: int, reason: str,
              message: str) -> None:
        raise readers.RecordError(reason, message, source.path, source.record_index(record_index), spec.key)

    def _build(self, task_index: int, spec: tasks.TaskSpec, source: readers.TaskRecords, record_index: int,
               position: int) -> dict:
        try:
            record = source[record_index]
        except json.JSONDecodeError as err:
            self._fail(spec, source, record_index, readers.REASON_MALFORMED, f"invalid JSON: {err}")
        problem = readers.check_record(record, spec)
        if problem is not None:
            self._fail(spec, source, record_index, *problem)
        draw = int(np.random.default_rng([self.config.seed, position]).integers(1 << 30))
        graph: Optional[MolGraph] = None
        if spec.has_graph:
            try:
                graph = molecules.graph_for(spec.graph_rule, record["input"], record, mode=self.config.feature_mode)
            except FeaturizationError as err:
                self._fail(spec, source, record_index, readers.REASON_BAD_MOLECULE, str(err))
        num_nodes = graph.num_nodes if graph is not None else 0
        num_edges = graph.num_edges if graph is not None else 0
        if num_nodes > self.config.row_nodes or num_edges > self.config.row_edges:
            self._fail(spec, source, record_index, readers.REASON_TOO_LONG,
                       f"{num_nodes} atoms / {num_edges} bonds exceed the row budget "
                       f"{self.config.row_nodes} / {self.config.row_edges}")
        answer = tasks.answer_text(spec, record)
        try:
            ids, labels = self._encode(tasks.user_message(spec, record, draw), answer, num_nodes)
            if len(ids) > self.config.seq_len and spec.question_pool and self.config.molcap_drop_selfies_if_too_long:
                # The public code retries an over-long molcap sample with the question alone.
                question = tasks.choose_question(spec, record, draw)
                ids, labels = self._encode(f"{IMAGE_PLACEHOLDER}\n{question}" if spec.has_graph else question,
                                           answer, num_nodes)
        except (TokenizerError, GraphSlotError) as err:  # e.g. a literal "<image>" inside the record's text
            self._fail(spec, source, record_index, readers.REASON_MALFORMED, str(err))
        if len(ids) > self.config.seq_len:
            self._fail(spec, source, record_index, readers.REASON_TOO_LONG,
                       f"{len(ids)} tokens (with {num_nodes} graph slots) > seq_len {self.config.seq_len}")
        if graph is None:
            nodes = np.zeros((0, self.num_atom_features), np.int32)
            edge_index = np.zeros((0, 2), np.int32)
            edges = np.zeros((0, self.num_bond_features), np.int32)
        else:
            nodes, edge_index, edges = graph.node_features, np.ascontiguousarray(graph.edge_index.T), \
                graph.edge_features
        return {"input_ids": ids, "labels": labels, "task_id": np.array([task_index], np.int32),
                "node_features": nodes.astype(np.int32), "edge_index": edge_index.astype(np.int32),
                "edge_features": edges.astype(np.int32)}

    def _encode(self, user_message: str, answer: str, num_nodes: int) -> tuple[np.ndarray, np.ndarray]:
        encoded = self.tokenizer.encode_chat(user_message, answer)
        return expand_image_placeholder(encoded.input_ids, num_nodes, labels=encoded.labels)


# --------------------------------------------------------------------------------------------------
# Rejection accounting (runs in the main process, after the workers).


class _AcceptedIterDataset(grain.IterDataset):
    """Drops rejected samples; their descriptions ride on the next accepted sample (key 'rejections'), so they
    are counted exactly once, when the batch holding that sample is consumed."""

    def __init__(self, parent: grain.IterDataset, max_consecutive_rejections: int):
        super().__init__(parent)
        self._max_consecutive_rejections = max_consecutive_rejections

    def __iter__(self) -> "_AcceptedIterator":
        return _AcceptedIterator(self._parent.__iter__(), self._max_consecutive_rejections)


class NoUsableSamplesError(RuntimeError):
    """Every record in a long run was rejected: the data or the limits (seq_len, atom budget) are wrong."""


class _AcceptedIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, max_consecutive_rejections: int = 5000):
        super().__init__(parent)
        self._pending: list[list] = []
        self._max_consecutive_rejections = max_consecutive_rejections

    def __next__(self) -> dict:
        while True:
            element = next(self._parent)
            if "_rejected" in element:
                self._pending.append(list(element["_rejected"]))
                if len(self._pending) >= self._max_consecutive_rejections:
                    reasons = collections.Counter((r[0], r[1]) for r in self._pending)
                    example = self._pending[-1]
                    raise NoUsableSamplesError(
                        f"the last {len(self._pending)} records were all rejected "
                        f"({', '.join(f'{task}/{reason}: {n}' for (task, reason), n in reasons.most_common(6))}); "
                        f"e.g. {example[4]}. Check data.seq_len, "
                        "data.nodes_per_row and the data files.")
                continue
            element = dict(element)
            element["rejections"] = self._pending
            self._pending = []
            return element

    def get_state(self) -> dict:
        return {"parent": self._parent.get_state(), "pending": [list(p) for p in self._pending]}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._pending = [list(p) for p in state["pending"]]

    def take_pending(self) -> list[list]:
        """Rejections after the last accepted sample (only left at the end of a finite stream)."""
        pending, self._pending = self._pending, []
        return pending


def _find_accepted_iterator(iterator: Any) -> Optional[_AcceptedIterator]:
    """The _AcceptedIterator inside a Grain iterator chain (it runs in this process, after any workers)."""
    todo = [iterator]
    while todo:
        node = todo.pop()
        if isinstance(node, _AcceptedIterator):
            return node
        todo.extend(getattr(node, "_parents", ()))
    return None


# --------------------------------------------------------------------------------------------------
# Rows and batches.

def _padded(array: np.ndarray, length: int, fill: int) -> np.ndarray:
    out = np.full((length,) + array.shape[1:], fill, dtype=np.int32)
    out[:len(array)] = array
    return out


def _segment_ids(length: int, used: int) -> np.ndarray:
    ids = np.zeros(length, np.int32)
    ids[:used] = 1
    return ids


def single_sample_row(sample: Mapping[str, Any], seq_len: int, nodes: int, edges: int, pad_id: int) -> dict:
    """One sample as a row in the layout the packer emits (segment ids 1 on real entries)."""
    length = len(sample["input_ids"])
    row = {
        "input_ids": _padded(sample["input_ids"], seq_len, pad_id),
        "labels": _padded(sample["labels"], seq_len, IGNORE_INDEX),
        "input_ids_segment_ids": _segment_ids(seq_len, length),
        "input_ids_positions": np.where(np.arange(seq_len) < length, np.arange(seq_len), 0).astype(np.int32),
        "task_id": sample["task_id"].astype(np.int32),
        "task_id_segment_ids": np.ones(1, np.int32),
        "node_features": _padded(sample["node_features"], nodes, 0),
        "node_features_segment_ids": _segment_ids(nodes, len(sample["node_features"])),
        "edge_index": _padded(sample["edge_index"], edges, 0),
        "edge_index_segment_ids": _segment_ids(edges, len(sample["edge_index"])),
        "edge_features": _padded(sample["edge_features"], edges, 0),
        # per sample in the row, its list of rejections (the packer's layout for the meta feature)
        "rejections": [list(sample.get("rejections", []))],
    }
    return row


class _SingleSampleRow:
    def __init__(self, seq_len: int, nodes: int, edges: int, pad_id: int):
        self.seq_len, self.nodes, self.edges, self.pad_id = seq_len, nodes, edges, pad_id

    def __call__(self, sample: dict) -> dict:
        return single_sample_row(sample, self.seq_len, self.nodes, self.edges, self.pad_id)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def graph_budget_for(batch_size: int, nodes_per_row: int, edges_per_row: int, segments_per_row: int) -> GraphBudget:
    """Budget of the graph batch: every row's atoms, bonds and graphs fit, plus jraph's padding node/graph;
    rounded up to multiples of 8 so sharding over up to 8 data shards divides them."""
    return GraphBudget(max_nodes=_round_up(batch_size * nodes_per_row + 1, 8),
                       max_edges=_round_up(max(batch_size * edges_per_row, 1), 8),
                       max_graphs=_round_up(batch_size * segments_per_row + 1, 8))


class BatchAssembler:
    """Rows (packed or single-sample, identical shapes) -> the model batch.

    Output: input_ids / labels / positions / segment_ids / attention_mask / token_task_ids int32 [B, S];
    task_ids int32 [B, M] (task of segment j+1 of each row, -1 for none). Task ids index the pipeline's
    `task_keys` (the mixture's order), not the registry's TaskSpec.task_id. graphs: GraphBatch whose node
    `node_sample_index` is the row; rejections: the bad records skipped before these samples.
    """

    def __init__(self, batch_size: int, segments_per_row: int, pad_id: int, num_atom_features: int,
                 num_bond_features: int):
        self.batch_size = batch_size
        self.segments_per_row = segments_per_row
        self.pad_id = pad_id
        self.feature_widths = (num_atom_features, num_bond_features)

    def empty_row_like(self, row: Mapping[str, Any]) -> dict:
        empty = {}
        for key, value in row.items():
            if key == "rejections":
                empty[key] = []
            elif key == "input_ids":
                empty[key] = np.full_like(value, self.pad_id)
            elif key == "labels":
                empty[key] = np.full_like(value, IGNORE_INDEX)
            elif key == "task_id":
                empty[key] = np.full_like(value, -1)
            else:
                empty[key] = np.zeros_like(value)
        return empty

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict:
        rows = list(rows)
        if not rows:
            raise ValueError("cannot assemble an empty batch")
        while len(rows) < self.batch_size:  # the last, partial batch of a finite stream keeps the static shape
            rows.append(self.empty_row_like(rows[0]))
        seq_len = len(rows[0]["input_ids"])
        nodes_per_row = len(rows[0]["node_features"])
        edges_per_row = len(rows[0]["edge_index"])
        segment_ids = np.stack([r["input_ids_segment_ids"] for r in rows]).astype(np.int32)
        positions = np.stack([r["input_ids_positions"] for r in rows]).astype(np.int32)
        input_ids = np.stack([r["input_ids"] for r in rows]).astype(np.int32)
        labels = np.stack([r["labels"] for r in rows]).astype(np.int32)
        input_ids = np.where(segment_ids > 0, input_ids, self.pad_id)
        labels = np.where(segment_ids > 0, labels, IGNORE_INDEX)
        positions = np.where(segment_ids > 0, positions, 0)
        task_ids = np.full((self.batch_size, self.segments_per_row), -1, np.int32)
        token_task_ids = np.full((self.batch_size, seq_len), -1, np.int32)
        graphs: list[Optional[MolGraph]] = []
        graph_rows: list[int] = []
        for row_index, row in enumerate(rows):
            used = int(np.count_nonzero(row["task_id_segment_ids"]))
            row_tasks = np.asarray(row["task_id"][:used], np.int32)
            task_ids[row_index, :used] = row_tasks
            seg = segment_ids[row_index]
            token_task_ids[row_index] = np.where(seg > 0, np.concatenate([[-1], row_tasks])[seg], -1)
            node_seg, edge_seg = row["node_features_segment_ids"], row["edge_index_segment_ids"]
            for segment in range(1, used + 1):
                node_mask = node_seg == segment
                if not node_mask.any():
                    continue  # a text-only sample
                edge_mask = edge_seg == segment
                graphs.append(MolGraph(node_features=np.asarray(row["node_features"][node_mask], np.int32),
                                       edge_index=np.ascontiguousarray(row["edge_index"][edge_mask].T, np.int32),
                                       edge_features=np.asarray(row["edge_features"][edge_mask], np.int32)))
                graph_rows.append(row_index)
        budget = graph_budget_for(self.batch_size, nodes_per_row, edges_per_row, self.segments_per_row)
        graph_batch, _ = batch_graphs(graphs, budget, rows=graph_rows, strict=True,
                                      feature_widths=self.feature_widths)
        rejections = [list(r) for row in rows for per_sample in row.get("rejections", []) for r in per_sample]
        return {
            "input_ids": input_ids, "labels": labels, "positions": positions, "segment_ids": segment_ids,
            "attention_mask": (segment_ids > 0).astype(np.int32), "task_ids": task_ids,
            "token_task_ids": token_task_ids, "graphs": graph_batch, "rejections": rejections,
        }


class _BucketBatchesIterDataset(grain.IterDataset):
    """Windowed length bucketing: read `window` samples, place each in the smallest bucket whose row length,
    atom and bond budgets hold it, cut each bucket (smallest first, leftovers moving up) into batches of
    `batch_size` rows and emit them in a seeded order. State: the parent state at the window start plus
    the number of batches emitted from the window, so a restore rebuilds the window exactly."""

    def __init__(self, parent: grain.IterDataset, config: DataConfig, pad_id: int):
        super().__init__(parent)
        self.config = config
        self.pad_id = pad_id

    def __iter__(self) -> "_BucketBatchesIterator":
        return _BucketBatchesIterator(self._parent.__iter__(), self.config, self.pad_id)


class _BucketBatchesIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, config: DataConfig, pad_id: int):
        super().__init__(parent)
        self.config = config
        self.pad_id = pad_id
        self.window_size = config.batch_size * config.bucket_window_batches
        lengths = config.buckets
        self.buckets = [(length, max(1, config.row_nodes * length // config.seq_len),
                         max(1, config.row_edges * length // config.seq_len)) for length in lengths]
        self._window_state = self._parent.get_state()
        self._window_index = 0
        self._batches: Optional[list[list[dict]]] = None
        self._emitted = 0
        self._skip = 0

    def _bucket_of(self, sample: Mapping[str, Any]) -> int:
        length, nodes, edges = len(sample["input_ids"]), len(sample["node_features"]), len(sample["edge_index"])
        for index, (max_length, max_nodes, max_edges) in enumerate(self.buckets):
            if length <= max_length and nodes <= max_nodes and edges <= max_edges:
                return index
        return len(self.buckets) - 1  # fits the full row (checked when the sample was built)

    def _make_batches(self, samples: list[dict]) -> list[list[dict]]:
        by_bucket: list[list[dict]] = [[] for _ in self.buckets]
        for sample in samples:
            by_bucket[self._bucket_of(sample)].append(sample)
        batches: list[list[dict]] = []
        carry: list[dict] = []
        size = self.config.batch_size
        for index, members in enumerate(by_bucket):
            group = carry + sorted(members, key=lambda s: len(s["input_ids"]))
            full = len(group) // size * size
            last = index == len(self.buckets) - 1
            cut = len(group) if last else full
            length, nodes, edges = self.buckets[index]
            for start in range(0, cut, size):
                batches.append([single_sample_row(s, length, nodes, edges, self.pad_id)
                                for s in group[start:start + size]])
            carry = group[cut:]
        order = np.random.default_rng([self.config.seed, 7919, self._window_index]).permutation(len(batches))
        return [batches[i] for i in order]

    def __next__(self) -> list[dict]:
        while self._batches is None or self._emitted >= len(self._batches):
            if self._batches is not None:  # the window is used up: the next one starts here
                self._window_index += 1
                self._window_state = self._parent.get_state()
            samples = []
            for _ in range(self.window_size):
                try:
                    samples.append(next(self._parent))
                except StopIteration:
                    break
            if not samples:
                self._batches = None
                raise StopIteration
            self._batches = self._make_batches(samples)
            self._emitted = min(self._skip, len(self._batches))
            self._skip = 0
        batch = self._batches[self._emitted]
        self._emitted += 1
        return batch

    def get_state(self) -> dict:
        return {"parent": self._window_state, "window": self._window_index,
                "emitted": self._emitted if self._batches is not None else self._skip}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._window_state = state["parent"]
        self._window_index = int(state["window"])
        self._batches = None
        self._emitted = 0
        self._skip = int(state["emitted"])


# --------------------------------------------------------------------------------------------------
# Bad-record statistics and the checkpointable device iterator.


class BadRecordStats:
    """Skipped records counted per task and reason; the first few of each kind are logged."""

    def __init__(self, max_logged: int = 3):
        self.max_logged = max_logged
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, rejection: Sequence[Any]) -> None:
        task, reason, path, record_index, message = rejection
        key = (str(task), str(reason))
        self.counts[key] += 1
        bucket = self.examples.setdefault(f"{task}/{reason}", [])
        if len(bucket) < self.max_logged:
            bucket.append(f"{path} record {record_index}: {message}")
            logger.warning("skipped a bad record (%s, %s): %s record %s: %s", task, reason, path, record_index,
                           message)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def by_task(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for (task, reason), count in sorted(self.counts.items()):
            out.setdefault(task, {})[reason] = count
        return out

    def to_dict(self) -> dict:
        return {"counts": [[t, r, c] for (t, r), c in sorted(self.counts.items())], "examples": self.examples}

    def load_dict(self, state: Mapping[str, Any]) -> None:
        self.counts = collections.Counter({(t, r): int(c) for t, r, c in state.get("counts", [])})
        self.examples = {k: list(v) for k, v in state.get("examples", {}).items()}


def leaf_sharding(batch_sharding: Any, array: np.ndarray, process_count: int) -> Any:
    """The batch sharding's split of dim 0 applied to an array of any rank (replicated if indivisible on a
    single process)."""
    from jax.sharding import NamedSharding, PartitionSpec

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


_leaf_sharding = leaf_sharding  # the name train/batches.py imports


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


def place_batch(batch: dict, batch_sharding: Any, *, process_index: int = 0, process_count: int = 1,
                batch_size: Optional[int] = None) -> dict:
    """Puts a host batch on devices: every array is split along dim 0 like the batch sharding (graph arrays
    too; with several processes their indices are made global first)."""
    import jax

    if process_count > 1:
        batch = dict(batch)
        batch["graphs"] = globalize_graph_indices(batch["graphs"], batch_size or batch["input_ids"].shape[0],
                                                  process_index)

    def put(array: np.ndarray) -> jax.Array:
        sharding = leaf_sharding(batch_sharding, array, process_count)
        if process_count > 1:
            global_shape = (array.shape[0] * process_count,) + array.shape[1:]
            return jax.make_array_from_process_local_data(sharding, array, global_shape)
        return jax.device_put(array, sharding)

    return jax.tree.map(put, batch)


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
                                batch_size=self.pipeline.config.batch_size)
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
        accepted = _find_accepted_iterator(self._iterator)
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


# --------------------------------------------------------------------------------------------------
# The pipeline.


class Pipeline:
    """Builds the Grain dataset for a DataConfig; `iterator()` gives a DataIterator."""

    def __init__(self, config: DataConfig, tokenizer: Optional[ChatTokenizer] = None,
                 sources: Optional[Mapping[str, readers.TaskRecords]] = None):
        config.validate()
        self.config = config
        self.tokenizer = tokenizer or load_chat_tokenizer(config.tokenizer_path(), double_bos=config.double_bos)
        entries = parse_mixture(config.tasks, config.mixture)
        if entries[0][1] is None:  # "all" or "paper"
            names = readers.available_tasks(config.data_dir, config.layout) if sources is None else list(sources)
            if entries[0][0] == "paper":
                names = [name for name in names if name in tasks.PAPER_TASKS]
            if not names:
                raise FileNotFoundError(f"no task files in {config.data_dir} ({config.layout} layout)")
            entries = [(name, 1.0) for name in names]
        self.task_keys = [name for name, _ in entries]
        self.values = [float(value) for _, value in entries]
        if sources is None:
            sources = readers.open_tasks(config.data_dir, self.task_keys, config.split, config.layout)
        missing = [k for k in self.task_keys if k not in sources]
        if missing:
            raise KeyError(f"no source for tasks {missing}")
        self.sources = [sources[k] for k in self.task_keys]
        for key, source in zip(self.task_keys, self.sources):
            if len(source) == 0:
                raise ValueError(f"task {key!r}: no {config.split!r} records in {source.path}"
                                 + (f" ({source.num_without_split} records have no metadata.split)"
                                    if source.num_without_split else ""))
        self.process = _process_shard(config)
        self.builder = SampleBuilder(self.task_keys, self.sources, self.tokenizer, config)
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
        """Accepted samples for this process (rejections ride along, see _AcceptedIterDataset)."""
        config = self.config
        dataset = self.index_dataset().map(self.builder)
        iterable = dataset.to_iter_dataset(grain.ReadOptions(num_threads=max(1, config.num_threads),
                                                             prefetch_buffer_size=max(16, 4 * config.batch_size)))
        if config.num_workers > 0:
            from absl import flags  # Grain's worker processes read absl flags, which a non-absl program never parses

            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.num_workers))
        return _AcceptedIterDataset(iterable, config.max_consecutive_rejections)

    def _build(self) -> grain.IterDataset:
        config = self.config
        samples = self.sample_dataset()
        assembler = BatchAssembler(config.batch_size, config.segments_per_row, self.tokenizer.pad_id,
                                   self.builder.num_atom_features, self.builder.num_bond_features)
        if config.batching == "pack":
            segments = config.max_samples_per_row
            length_struct = {"input_ids": config.seq_len, "labels": config.seq_len, "task_id": segments,
                             "node_features": config.row_nodes, "edge_index": config.row_edges,
                             "edge_features": config.row_edges}
            padding = {"input_ids": self.tokenizer.pad_id, "labels": IGNORE_INDEX, "task_id": -1,
                       "node_features": 0, "edge_index": 0, "edge_features": 0}
            packed = grain.experimental.FirstFitPackIterDataset(
                samples, length_struct=length_struct, num_packing_bins=config.batch_size * config.pack_window_batches,
                seed=config.seed, shuffle_bins=True, meta_features=("rejections",), padding_struct=padding,
                max_sequences_per_bin=segments)
            return packed.batch(config.batch_size, drop_remainder=False, batch_fn=assembler)
        if config.batching == "bucket":
            return _BucketBatchesIterDataset(samples, config, self.tokenizer.pad_id).map(assembler)
        rows = samples.map(_SingleSampleRow(config.seq_len, config.row_nodes, config.row_edges,
                                            self.tokenizer.pad_id))
        return rows.batch(config.batch_size, drop_remainder=False, batch_fn=assembler)

    def iterator(self, batch_sharding: Any = None) -> DataIterator:
        return DataIterator(self, batch_sharding)

    def calibration_graphs(self, max_graphs: int = 512) -> list[MolGraph]:
        """Up to `max_graphs` molecule graphs of the training split, for setting a random graph tower's batch-norm
        statistics: the graph tasks' records taken round-robin in file order, bad records skipped. The same on
        every process and in every run, and it leaves the sample stream (and so exact resume) untouched."""
        graph_tasks = [(spec, source) for spec, source in zip(self.builder.specs, self.sources) if spec.has_graph]
        order = sorted((index, task) for task, (_, source) in enumerate(graph_tasks) for index in range(len(source)))
        graphs: list[MolGraph] = []
        for index, task in order:
            if len(graphs) == max_graphs:
                break
            spec, source = graph_tasks[task]
            try:
                record = source[index]
                if readers.check_record(record, spec) is not None:
                    continue
                graph = molecules.graph_for(spec.graph_rule, record["input"], record, mode=self.config.feature_mode)
            except (json.JSONDecodeError, readers.RecordError, FeaturizationError):
                continue  # the sample stream reports bad records; calibration just uses the good ones
            if graph.num_nodes:
                graphs.append(graph)
        return graphs


def build_pipeline(config: DataConfig, tokenizer: Optional[ChatTokenizer] = None) -> Pipeline:
    return Pipeline(config, tokenizer)


# --------------------------------------------------------------------------------------------------
# Prompts for generation (evaluation).


@dataclasses.dataclass(frozen=True)
class GenerationExample:
    """One test prompt: ids up to the assistant header (graph slots expanded), its graph, the reference."""

    task: str
    input_ids: np.ndarray
    graph: Optional[MolGraph]
    reference: str
    record: dict


def generation_example(spec: tasks.TaskSpec, record: Mapping[str, Any], tokenizer: ChatTokenizer,
                       feature_mode: str = "omnimol", question_draw: Optional[int] = None) -> GenerationExample:
    """The prompt the model answers at evaluation (raises RecordError / FeaturizationError on bad records)."""
    problem = readers.check_record(record, spec)
    if problem is not None:
        raise readers.RecordError(*problem, task=spec.key)
    graph = molecules.graph_for(spec.graph_rule, record["input"], record, mode=feature_mode) \
        if spec.has_graph else None
    encoded = tokenizer.encode_prompt(tasks.user_message(spec, record, question_draw))
    ids, _ = expand_image_placeholder(encoded.input_ids, graph.num_nodes if graph is not None else 0)
    return GenerationExample(spec.key, ids, graph, tasks.answer_text(spec, record), dict(record))


def batch_statistics(batch: Mapping[str, Any]) -> dict[str, float]:
    """Share of real tokens and real atom slots in a host batch (for logs and the benchmark)."""
    segment_ids = np.asarray(batch["segment_ids"])
    graphs: GraphBatch = batch["graphs"]
    node_rows = np.asarray(graphs.node_sample_index)
    slots = int(np.count_nonzero(np.asarray(batch["input_ids"]) == IMAGE_TOKEN_ID))
    return {"real_token_share": float(np.count_nonzero(segment_ids) / segment_ids.size),
            "real_node_share": float(np.count_nonzero(node_rows >= 0) / node_rows.size),
            "samples": int(np.count_nonzero(np.asarray(batch["task_ids"]) >= 0)),
            "graph_slots": slots}

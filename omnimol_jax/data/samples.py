"""One sample from one record: read, check, render the prompt (docs/omnimol.md §5), featurise the graph, tokenise
with labels on the answer only and expand the graph placeholder. Runs in Grain worker threads/processes.
"""
from __future__ import annotations

import json
from typing import Optional, Sequence

import numpy as np

from omnimol_jax import tasks
from omnimol_jax.config import DataConfig
from omnimol_jax.constants import (
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    NUM_ATOM_FEATURES,
    NUM_BOND_FEATURES,
)
from omnimol_jax.data import molecules, prompts, readers
from omnimol_jax.data.featurize import FeaturizationError, MolGraph
from omnimol_jax.data.graph_slots import GraphSlotError, count_graph_slots, expand_image_placeholder
from omnimol_jax.data.rejections import Rejection
from omnimol_jax.data.tokenizer import ChatTokenizer, TokenizerError


class SampleBuilder:
    """(task index, record index, stream position) -> sample arrays, or {'_rejected': Rejection fields}; a sample
    cut at seq_len (data.overlong=truncate) also carries '_truncated': Rejection fields, to be counted.

    Sample: input_ids / labels int32 [L] (graph slots expanded), task_id int32 [1] (the task's index in the
    pipeline's `task_keys`), node_features int32 [N, F], edge_index int32 [E, 2] (local atom indices),
    edge_features int32 [E, Fb]. Runs in Grain workers.
    """

    def __init__(self, task_keys: Sequence[str], sources: Sequence[readers.TaskRecords], tokenizer: ChatTokenizer,
                 config: DataConfig, feature_mode: str):
        self.specs = [tasks.get_task(k) if config.graph_tokens else tasks.without_graph(tasks.get_task(k))
                      for k in task_keys]
        self.sources = list(sources)
        self.tokenizer = tokenizer
        self.config = config
        self.feature_mode = feature_mode
        self.num_atom_features = NUM_ATOM_FEATURES[feature_mode]
        self.num_bond_features = NUM_BOND_FEATURES[feature_mode]

    def build(self, task_index: int, record_index: int, position: int = 0) -> dict:
        """The sample of one record; RecordError (naming file, record and reason) when it cannot be one."""
        return self._build(task_index, self.specs[task_index], self.sources[task_index], record_index, position)

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
        except UnicodeDecodeError as err:
            self._fail(spec, source, record_index, readers.REASON_MALFORMED, f"not valid UTF-8: {err}")
        problem = readers.check_record(record, spec)
        if problem is not None:
            self._fail(spec, source, record_index, *problem)
        draw = int(np.random.default_rng([self.config.seed, position]).integers(1 << 30))
        graph: Optional[MolGraph] = None
        if spec.has_graph:
            try:
                graph = molecules.graph_for(spec.graph_rule, record["input"], record, mode=self.feature_mode)
            except FeaturizationError as err:
                self._fail(spec, source, record_index, readers.REASON_BAD_MOLECULE, str(err))
        num_nodes = graph.num_nodes if graph is not None else 0
        num_edges = graph.num_edges if graph is not None else 0
        if num_nodes > self.config.row_nodes or num_edges > self.config.row_edges:
            self._fail(spec, source, record_index, readers.REASON_TOO_LONG,
                       f"{num_nodes} atoms / {num_edges} bonds exceed the row budget "
                       f"{self.config.row_nodes} / {self.config.row_edges}")
        answer = prompts.answer_text(spec, record)
        try:
            ids, labels = self._encode(prompts.user_message(spec, record, draw), answer, num_nodes)
            if len(ids) > self.config.seq_len and spec.question_pool and self.config.molcap_drop_selfies_if_too_long:
                # The public code retries an over-long molcap sample with the question alone.
                question = prompts.choose_question(spec, record, draw)
                ids, labels = self._encode(f"{IMAGE_PLACEHOLDER}\n{question}" if spec.has_graph else question,
                                           answer, num_nodes)
        except (TokenizerError, GraphSlotError) as err:  # e.g. a literal "<image>" inside the record's text
            self._fail(spec, source, record_index, readers.REASON_MALFORMED, str(err))
        truncated = None
        if len(ids) > self.config.seq_len:
            too_long = f"{len(ids)} tokens (with {num_nodes} graph slots) > seq_len {self.config.seq_len}"
            if self.config.overlong != "truncate":
                self._fail(spec, source, record_index, readers.REASON_TOO_LONG, too_long)
            ids, labels = ids[:self.config.seq_len], labels[:self.config.seq_len]
            # The graph sits in the prompt, before the answer: a cut that keeps an answer token keeps every slot.
            if not np.any(labels != IGNORE_INDEX) or count_graph_slots(ids) != num_nodes:
                self._fail(spec, source, record_index, readers.REASON_TOO_LONG,
                           f"{too_long}, and cut there no answer token is left")
            truncated = Rejection(spec.key, readers.REASON_TRUNCATED, source.path, source.record_index(record_index),
                                  f"{too_long}: cut to seq_len").to_list()
        if graph is None:
            nodes = np.zeros((0, self.num_atom_features), np.int32)
            edge_index = np.zeros((0, 2), np.int32)
            edges = np.zeros((0, self.num_bond_features), np.int32)
        else:
            nodes, edge_index, edges = graph.node_features, np.ascontiguousarray(graph.edge_index.T), \
                graph.edge_features
        sample = {"input_ids": ids, "labels": labels, "task_id": np.array([task_index], np.int32),
                  "node_features": nodes.astype(np.int32), "edge_index": edge_index.astype(np.int32),
                  "edge_features": edges.astype(np.int32)}
        if truncated is not None:
            sample["_truncated"] = truncated  # counted with the skipped records (see rejections.py)
        return sample

    def _encode(self, user_message: str, answer: str, num_nodes: int) -> tuple[np.ndarray, np.ndarray]:
        encoded = self.tokenizer.encode_chat(user_message, answer)
        return expand_image_placeholder(encoded.input_ids, num_nodes, labels=encoded.labels)

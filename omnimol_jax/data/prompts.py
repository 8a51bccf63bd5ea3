"""Prompts for generation: a test record as the ids up to the assistant header, with its graph and reference.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import numpy as np

from omnimol_jax import tasks
from omnimol_jax.data import molecules, readers
from omnimol_jax.data.featurize import MolGraph
from omnimol_jax.data.graph_slots import expand_image_placeholder
from omnimol_jax.data.tokenizer import ChatTokenizer


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
    ids, graph = prompt_ids(spec, record, tokenizer, feature_mode, question_draw)
    return GenerationExample(spec.key, ids, graph, tasks.answer_text(spec, record), dict(record))


def prompt_ids(spec: tasks.TaskSpec, record: Mapping[str, Any], tokenizer: ChatTokenizer,
               feature_mode: str = "omnimol", question_draw: Optional[int] = None
               ) -> tuple[np.ndarray, Optional[MolGraph]]:
    """(prompt ids with graph slots expanded, graph or None) for a record that needs no answer (omnimol generate).
    A molecule input may be SMILES: it is converted to the SELFIES the model was trained on. Raises
    FeaturizationError (a ValueError) when the task's molecule cannot be read."""
    if spec.has_graph:
        record = {**record, "input": molecules.input_as_selfies(spec.graph_rule, record["input"])}
    graph = molecules.graph_for(spec.graph_rule, record["input"], record, mode=feature_mode) \
        if spec.has_graph else None
    encoded = tokenizer.encode_prompt(tasks.user_message(spec, record, question_draw))
    ids, _ = expand_image_placeholder(encoded.input_ids, graph.num_nodes if graph is not None else 0)
    return ids, graph

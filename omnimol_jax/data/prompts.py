"""A record as the model sees it: the user turn and the answer of each task (the templates of the task registry,
written as the public code writes them, docs/omnimol.md §5), and for generation a test record as the ids up to the
assistant header, with its graph and reference.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Mapping, Optional

import numpy as np

from omnimol_jax import tasks
from omnimol_jax.constants import IMAGE_PLACEHOLDER
from omnimol_jax.data import molecules, readers
from omnimol_jax.data.featurize import MolGraph
from omnimol_jax.data.graph_slots import expand_image_placeholder
from omnimol_jax.data.tokenizer import ChatTokenizer


def answer_text(spec: tasks.TaskSpec, record: Mapping[str, Any]) -> str:
    """The assistant answer as the model sees it (numbers are written as the public code does: str())."""
    output = record["output"]
    return output if isinstance(output, str) else str(output)


def choose_question(spec: tasks.TaskSpec, record: Mapping[str, Any], draw: Optional[int] = None) -> str:
    """Picks the molcap question. `draw` (e.g. from the pipeline's per-sample RNG) selects it; without it the
    choice is a stable hash of the input, so rendering a record twice gives the same prompt."""
    pool = spec.question_pool
    if draw is None:
        draw = int.from_bytes(hashlib.blake2b(str(record.get("input", "")).encode(), digest_size=4).digest(), "little")
    return pool[draw % len(pool)]


def user_text(spec: tasks.TaskSpec, record: Mapping[str, Any], question_draw: Optional[int] = None) -> str:
    """The user turn after the placeholder, exactly as the public code writes it."""
    instruction = choose_question(spec, record, question_draw) if spec.question_pool else record["instruction"]
    return spec.user_template.format(instruction=instruction, input=record["input"])


def user_message(spec: tasks.TaskSpec, record: Mapping[str, Any], question_draw: Optional[int] = None) -> str:
    """The whole user turn: the `<image>` placeholder line for graph tasks, then the user text."""
    text = user_text(spec, record, question_draw)
    return f"{IMAGE_PLACEHOLDER}\n{text}" if spec.has_graph else text


def chat_text(spec: tasks.TaskSpec, record: Mapping[str, Any], question_draw: Optional[int] = None,
              with_answer: bool = True, system: str = tasks.SYSTEM_PROMPT) -> str:
    """The full llama3 conversation string of docs/omnimol.md (one BOS written; the tokenizer may add the second)."""
    text = (f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>"
            f"<|start_header_id|>user<|end_header_id|>\n\n{user_message(spec, record, question_draw)}<|eot_id|>"
            f"<|start_header_id|>assistant<|end_header_id|>\n\n")
    if with_answer:
        text += f"{answer_text(spec, record)}<|eot_id|>"
    return text



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
    return GenerationExample(spec.key, ids, graph, answer_text(spec, record), dict(record))


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
    encoded = tokenizer.encode_prompt(user_message(spec, record, question_draw))
    ids, _ = expand_image_placeholder(encoded.input_ids, graph.num_nodes if graph is not None else 0)
    return ids, graph

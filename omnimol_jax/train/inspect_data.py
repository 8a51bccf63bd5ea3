"""What a run trains on, record by record (`omnimol inspect-data`): each sample exactly as the pipeline builds it for
the config (the backbone's tokenizer and chat format, the task's template, graph slots expanded, labels), shown as
text with the supervised span marked, or as ids and labels (as Axolotl's preprocess debug shows them).
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Optional

import numpy as np

from omnimol_jax.config import Config, ConfigError
from omnimol_jax.constants import IGNORE_INDEX, IMAGE_TOKEN_ID
from omnimol_jax.data import readers
from omnimol_jax.data.pipeline import Pipeline
from omnimol_jax.data.tokenizer import ChatTokenizer, load_chat_tokenizer
from omnimol_jax.train.backbone import resolve_backbone, tokenizer_folder

SUPERVISED_OPEN, SUPERVISED_CLOSE = "\u00ab", "\u00bb"  # « »: the span the loss is taken on


@dataclasses.dataclass
class InspectedSample:
    task: str
    file: str
    record: int
    input_ids: list[int]            # graph slots are IMAGE_TOKEN_ID (-200)
    labels: list[int]               # IGNORE_INDEX (-100) where no loss is taken
    num_atoms: int
    num_bonds: int                  # directed bond entries (each bond twice)
    rejected: Optional[str] = None  # why training skips the record (then ids and labels are empty)

    @property
    def supervised(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def marked_text(sample: InspectedSample, tokenizer: ChatTokenizer) -> str:
    """The sample's text as the model reads it: graph slots as `<graph: N atoms>`, supervised tokens between « »."""
    pieces, run, run_supervised = [], [], False

    def flush():
        if run:
            text = tokenizer.decode(run)
            pieces.append(f"{SUPERVISED_OPEN}{text}{SUPERVISED_CLOSE}" if run_supervised else text)
            run.clear()

    ids, labels = np.asarray(sample.input_ids), np.asarray(sample.labels)
    index = 0
    while index < len(ids):
        if ids[index] == IMAGE_TOKEN_ID:
            flush()
            end = index
            while end < len(ids) and ids[end] == IMAGE_TOKEN_ID:
                end += 1
            pieces.append(f"<graph: {end - index} atoms>")
            index = end
            continue
        supervised = labels[index] != IGNORE_INDEX
        if supervised != run_supervised:
            flush()
            run_supervised = supervised
        run.append(int(ids[index]))
        index += 1
    flush()
    return "".join(pieces)


def run_tokenizer(config: Config, progress: bool = True) -> ChatTokenizer:
    """The tokenizer a training run of `config` reads (data.tokenizer, else the backbone's, else the data's)."""
    folder = tokenizer_folder(config.data, resolve_backbone(config.init, progress=progress))
    return load_chat_tokenizer(folder, double_bos=config.data.double_bos, chat_format=config.data.chat_format)


def inspect_samples(config: Config, tasks: Optional[list[str]] = None, count: int = 3,
                    progress: bool = True) -> tuple[ChatTokenizer, Iterator[InspectedSample]]:
    """(the run's tokenizer, the first `count` records of each task as samples), in file order."""
    tokenizer = run_tokenizer(config, progress)
    pipeline = Pipeline(config.data, tokenizer, feature_mode=config.graph.feature_mode)
    wanted = pipeline.task_keys if not tasks else tasks
    unknown = [t for t in wanted if t not in pipeline.task_keys]
    if unknown:
        raise ConfigError(f"--task: {unknown} not in this config's data.tasks ({', '.join(pipeline.task_keys)})")

    def samples() -> Iterator[InspectedSample]:
        for task in wanted:
            task_index = pipeline.task_keys.index(task)
            source = pipeline.sources[task_index]
            for record_index in range(min(count, len(source))):
                where = dict(task=task, file=str(source.path), record=source.record_index(record_index))
                try:
                    sample = pipeline.builder.build(task_index, record_index)
                except readers.RecordError as err:
                    yield InspectedSample(**where, input_ids=[], labels=[], num_atoms=0, num_bonds=0,
                                          rejected=str(err))
                    continue
                yield InspectedSample(**where, input_ids=sample["input_ids"].tolist(),
                                      labels=sample["labels"].tolist(), num_atoms=len(sample["node_features"]),
                                      num_bonds=len(sample["edge_index"]))

    return tokenizer, samples()

"""Validation loss during training: cross entropy overall and per task on a fixed sample of the test split."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import numpy as np

from omnimol_jax.config import Config
from omnimol_jax.data import readers
from omnimol_jax.data.loader import model_batch, place_batch
from omnimol_jax.data.pipeline import Pipeline
from omnimol_jax.data.tokenizer import ChatTokenizer
from omnimol_jax.sharding import batch_sharding
from omnimol_jax.train.metrics_log import per_task_scalars


class Validation:
    """Calls the (jitted once) eval step over up to `train.eval_batches` test batches. Every call sees the same
    batches: a fixed-seed shuffle over all tasks (the test stream itself is ordered task by task). A task with no
    test records is left out (said once); the others are still validated."""

    def __init__(self, config: Config, tokenizer: ChatTokenizer, task_names: list[str], eval_step: Callable,
                 mesh: Any, say: Callable[[str], None] = print, task_values: Optional[list[float]] = None):
        self.config, self.tokenizer, self.task_names, self.mesh, self.say = config, tokenizer, task_names, mesh, say
        self.task_values = list(task_values) if task_values is not None else [1.0] * len(task_names)
        self.eval_step = jax.jit(eval_step)  # once: every evaluation reuses its compilations
        self.process_index, self.process_count = jax.process_index(), jax.process_count()
        self._sources: Optional[dict[str, readers.TaskRecords]] = None

    def _test_sources(self) -> dict[str, readers.TaskRecords]:
        """The test split of every training task that has one, indexed once."""
        if self._sources is None:
            data = self.config.data
            self._sources, left_out = {}, []
            for name in self.task_names:
                try:
                    source = readers.open_task(data.data_dir, name, "test", data.layout, strict=data.strict)
                except FileNotFoundError as err:
                    left_out.append(f"{name} ({err})")
                    continue
                if len(source) == 0:
                    left_out.append(f"{name} (no test records in {source.path})")
                    continue
                self._sources[name] = source
            if left_out:
                self.say(f"warning: validation leaves out {len(left_out)} task(s) without test records: "
                         f"{'; '.join(left_out)}")
        return self._sources

    def __call__(self, trainable: Any, frozen: Any) -> dict[str, float]:
        cfg = self.config
        sources = self._test_sources()
        if not sources:
            return {}
        mixture = "/".join(f"{name}:{value!r}" for name, value in zip(self.task_names, self.task_values)
                           if name in sources)
        eval_data = dataclasses.replace(cfg.data, split="test", shuffle=True, seed=cfg.data.seed + 1, num_epochs=1,
                                        prefetch_batches=0, tasks=mixture)
        pipeline = Pipeline(eval_data, tokenizer=self.tokenizer, sources=sources,
                            feature_mode=cfg.graph.feature_mode, grad_accum_steps=cfg.train.grad_accum_steps)
        iterator = pipeline.iterator()
        num_tasks = len(self.task_names)
        sums, counts = np.zeros(num_tasks), np.zeros(num_tasks)
        total, tokens = 0.0, 0.0
        index = {name: i for i, name in enumerate(self.task_names)}
        remap = np.array([index.get(name, -1) for name in pipeline.task_keys] + [-1], np.int32)
        try:
            for _ in range(cfg.train.eval_batches):
                try:
                    host = next(iterator)
                except StopIteration:
                    break
                # the eval pipeline numbers its tasks itself; map them onto the training task ids
                host = dict(host, token_task_ids=remap[host["token_task_ids"]])
                batch = place_batch(model_batch(host), batch_sharding(self.mesh), process_index=self.process_index,
                                    process_count=self.process_count)
                out = jax.device_get(self.eval_step(trainable, frozen, batch))
                sums += out["task_ce_sum"]
                counts += out["task_tokens"]
                total += float(out["ce_sum"])
                tokens += float(out["tokens"])
        finally:
            iterator.close()
        scalars = {"loss": total / max(tokens, 1.0), "supervised_tokens": tokens}
        scalars.update(per_task_scalars("task_loss", self.task_names, sums, counts))
        return scalars

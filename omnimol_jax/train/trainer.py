"""`omnimol train`: stage 1 (projector alignment) or stage 2 (MoGE SFT) under jit shardings over the mesh.

A run lives in `train.output_dir`:
    config.yaml          the resolved config of the latest start (each checkpoint also stores its own)
    config_changes.jsonl bookkeeping keys changed on resume (train/config_contract.py)
    frozen/              the frozen weights, written when the run starts afresh (model checkpoint format)
    checkpoints/<step>/  Orbax: train state (trainable params, optimizer, step, RNG, counters), data iterator, config
    metrics.jsonl, tensorboard/, loss_per_task.png, expert_usage.png, profile/ (with train.profile_steps)
    final/               the trained model as a model checkpoint (eval/generate/export read it)
    .omnimol-run.lock    held while a process writes the directory (train/run_directory.py)
Resuming (the same command again) picks the newest checkpoint that restores, after checking the config against
the one that checkpoint was written with; stopping by SIGTERM/SIGINT saves a checkpoint first, so preempted runs
continue exactly. A rerun after the last step goes on to validation and export, or reports that the run is
complete.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import numpy as np
from flax import nnx

from omnimol_jax import checkpoint as model_ckpt
from omnimol_jax.config import Config, ConfigError, batch_geometry, save_config
from omnimol_jax.data.graphs import batch_graphs, prompt_graph_budget
from omnimol_jax.data.loader import place_micro_batches
from omnimol_jax.data.pipeline import Pipeline
from omnimol_jax.data.tokenizer import load_chat_tokenizer
from omnimol_jax.errors import RunError
from omnimol_jax.graph_batch import node_mask
from omnimol_jax.model.build import omnimol_constructor
from omnimol_jax.model.gin import mean_pairwise_cosine
from omnimol_jax.sharding import batch_shard_count, build_mesh, create_sharded_model, use_mesh
from omnimol_jax.train.backbone import resolve_backbone, tokenizer_folder
from omnimol_jax.train.checkpoints import RunCheckpoints, abstract_like
from omnimol_jax.train.config_contract import ConfigChanges, check_resume, describe_changes, upgrade_stored_config
from omnimol_jax.train.hooks import (
    CheckpointHook,
    CompileHook,
    EvalHook,
    ExportHook,
    Hook,
    MetricsHook,
    NonFiniteStopHook,
    ProfileHook,
    RunState,
    SignalHook,
    UntilStepHook,
)
from omnimol_jax.train.metrics_log import MetricLogger, plot_run
from omnimol_jax.train.program import run_train_program
from omnimol_jax.train.recipes import run_trainable_filter
from omnimol_jax.train.run_directory import RunDirectory
from omnimol_jax.train.step import TrainState
from omnimol_jax.train.validation import Validation

logger = logging.getLogger(__name__)


class TrainingError(RunError):
    pass


@dataclasses.dataclass
class RunResult:
    final_step: int
    stopped_by: str                  # "max_steps" | "signal" | "nonfinite" | "until_step" | "already_complete"
    checkpoint_step: Optional[int]
    output_dir: Path
    losses: list[float]
    final_state: Any = None
    signal: Optional[int] = None     # the signal number when stopped_by == "signal"


class Trainer:
    def __init__(self, config: Config, *, progress: bool = True, log: Callable[[str], None] = print,
                 devices: Optional[list] = None):
        config.validate()
        self.config = config
        self.progress = progress
        self.say = log
        self.output_dir = Path(config.train.output_dir)
        self.mesh = build_mesh(config.mesh, devices)
        self.process_index, self.process_count = jax.process_index(), jax.process_count()
        # One writer per run directory, from here until run() ends. Everything that can reject the input (config
        # contract, task files, strict record checks) runs before anything is written into the directory.
        self.run_directory = RunDirectory(self.output_dir, primary=self.process_index == 0).acquire()
        try:
            self._setup()
        except BaseException:
            self.run_directory.release(failed=True)
            raise

    def _setup(self) -> None:
        config = self.config
        self.checkpoints: Optional[RunCheckpoints] = None
        self.config_changes = ConfigChanges({}, {}, {})
        self.resuming = False
        if (self.output_dir / "checkpoints").is_dir():
            self.checkpoints = self._open_checkpoints()
            self.resuming = bool(self.checkpoints.steps())
            stored = self.checkpoints.latest_config()
            if stored is not None:
                step, stored_config = stored
                stored_config = upgrade_stored_config(stored_config, self.process_count)
                self.config_changes = check_resume(stored_config, self._config_dict(),
                                                   config.train.allow_config_change, str(self.output_dir), step)
                if self.config_changes.applied:
                    self.say(f"config changes applied on resume: {describe_changes(self.config_changes.applied)}")
                if self.config_changes.ignored:
                    self.say(f"warning: {describe_changes(self.config_changes.ignored)}: not used, the run resumes "
                             "from its own checkpoints")
        # A finished run is answered from metadata alone (rerunning the command on a pod must not restore the
        # whole train state to say so): final/ holds the model of the newest checkpoint, at or past max_steps.
        final_step = self._final_step() if self.resuming else None
        self.complete_at = (final_step if final_step is not None and final_step >= config.train.max_steps
                            and final_step == self.checkpoints.steps()[-1] else None)
        if self.complete_at is not None:
            return

        self.backbone = resolve_backbone(config.init, progress=self.progress)
        self.tokenizer_dir = tokenizer_folder(config.data, self.backbone)
        tokenizer = load_chat_tokenizer(self.tokenizer_dir, double_bos=config.data.double_bos,
                                        chat_format=config.data.chat_format)
        self.pipeline = Pipeline(config.data, tokenizer, feature_mode=config.graph.feature_mode,
                                 grad_accum_steps=config.train.grad_accum_steps)
        self.task_names = list(self.pipeline.task_keys)
        self.num_tasks = len(self.task_names)
        if self.pipeline.tokenizer.vocab_size > config.model.vocab_size:
            raise ConfigError(f"model.vocab_size: {config.model.vocab_size}, but the tokenizer at "
                              f"{self.tokenizer_dir} has {self.pipeline.tokenizer.vocab_size} tokens")
        self.pipeline.check_records(say=self.say, progress=self.progress and self.process_index == 0)
        self._build_model()
        self.validation = Validation(config, self.pipeline.tokenizer, self.task_names, self.program.steps.eval_step,
                                     self.mesh,
                                     say=self.say, task_values=self.pipeline.values)

    def _open_checkpoints(self) -> RunCheckpoints:
        return RunCheckpoints(self.output_dir / "checkpoints", self.config.train.keep_checkpoints,
                              self.config.train.async_checkpointing)

    # ------------------------------------------------------------------------------------------------ model

    def _build_model(self) -> None:
        cfg = self.config
        constructor = omnimol_constructor(cfg.model, cfg.graph, seed=cfg.seed)
        model = create_sharded_model(constructor, self.mesh)
        trains = run_trainable_filter(cfg)
        frozen_dir = self.output_dir / "frozen"
        if self.resuming:
            if not (frozen_dir / model_ckpt.META_FILE).is_file():
                raise TrainingError(f"{frozen_dir} is missing: the run's checkpoints hold only the trained "
                                    "variables, the frozen ones are written there when the run starts")
            self.say(f"frozen weights from {frozen_dir} (written when this run started)")
            graphdef, trainable, frozen = nnx.split(model, trains, ...)
            shardings = {k: v.sharding for k, v in model_ckpt.flat_values(frozen).items()}
            stored = model_ckpt.load_params(frozen_dir, shardings)
            for key, variable in model_ckpt.flat_variables(frozen).items():
                variable.set_value(stored[key])
            model = nnx.merge(graphdef, trainable, frozen)
        else:
            self._initialise_weights(model)
        self.program = run_train_program(model, cfg, self.num_tasks)
        n_train = sum(x.size for x in jax.tree.leaves(self.program.trainable))
        n_frozen = sum(x.size for x in jax.tree.leaves(self.program.frozen))
        self.say(f"parameters: {n_train:,} trainable, {n_frozen:,} frozen (stage {cfg.train.stage})")
        self.say(f"batch: {batch_geometry(cfg, self.pipeline.process[1], batch_shard_count(self.mesh)).describe()}")
        if n_train == 0:
            raise TrainingError("no trainable parameters: stage 2 needs model.lora.enabled or model.moge.enabled, "
                                "stage 1 trains the projector")

    def _initialise_weights(self, model) -> None:
        init, backbone = self.config.init, self.backbone
        tower_loaded = False
        if backbone.kind == "hf":
            from omnimol_jax.convert.hf_llama import load_hf_weights

            load_hf_weights(model.language_model, init.hf, progress=self.progress)
            self.say(f"language model weights from {init.hf}")
        if backbone.kind == "gguf":
            from omnimol_jax.convert.hf_llama import check_same_architecture

            check_same_architecture(self.config.model, model_ckpt.read_metadata(backbone.weights)[0],
                                    f"{init.gguf} (imported to {backbone.weights})")
            self._load_matching(model, str(backbone.weights), lambda key: True)
        if backbone.kind == "checkpoint":
            tower_loaded = self._load_matching(model, init.checkpoint, lambda key: True)
        if init.moleculestm:
            from omnimol_jax.convert.moleculestm import load_moleculestm

            load_moleculestm(model.graph_tower, init.moleculestm)
            tower_loaded = True
            self.say(f"graph tower weights from {init.moleculestm}")
        if init.projector:  # stage 1's graph side: its projector, and its tower unless MoleculeSTM's is given
            parts = ("projector",) if init.moleculestm else ("projector", "graph_tower")
            tower_loaded = self._load_matching(model, init.projector, lambda key: key[0] in parts) or tower_loaded
        if not tower_loaded and self.config.graph.calibration_graphs > 0:
            self._calibrate_graph_tower(model)

    def _calibrate_graph_tower(self, model) -> None:
        """Batch-norm statistics of a random graph tower from training graphs (see GIN.calibrate_batch_norms)."""
        graphs = self.pipeline.calibration_graphs(self.config.graph.calibration_graphs)
        if not graphs:
            return  # text-only tasks: the tower never runs
        batch, _ = batch_graphs(graphs, prompt_graph_budget(graphs, rows=len(graphs)))
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        # The same graphs on every process: each provides the whole (replicated) array.
        batch = jax.tree.map(lambda x: jax.make_array_from_process_local_data(replicated, np.asarray(x)), batch)

        def calibrate(tower, b):
            mask = node_mask(b)
            before = mean_pairwise_cosine(tower(b.graphs, mask), mask)
            return before, mean_pairwise_cosine(tower.calibrate_batch_norms(b.graphs, mask), mask)

        with use_mesh(self.mesh):
            before, after = nnx.jit(calibrate)(model.graph_tower, batch)
        self.say(f"graph tower batch norms calibrated on {len(graphs)} training molecules "
                 f"({sum(g.num_nodes for g in graphs)} atoms): mean cosine between atoms {float(before):.2f} -> "
                 f"{float(after):.2f}")

    def _load_matching(self, model, directory: str, select: Callable[[tuple], bool]) -> bool:
        """Copies the checkpoint's variables that exist in the model (same path and shape); True when graph-tower
        variables were among them."""
        _, meta = model_ckpt.read_metadata(directory)
        stored = model_ckpt.load_params(directory)
        if meta.get("graph") is None:  # a language-model-only checkpoint
            stored = {("language_model",) + k: v for k, v in stored.items()}
        try:
            copied = model_ckpt.assign_params(model, {k: v for k, v in stored.items() if select(k)}, strict=False,
                                              kind=nnx.Variable)
        except model_ckpt.CheckpointError as err:
            raise TrainingError(f"{directory}: {err}") from None
        if copied == 0:
            raise TrainingError(f"{directory}: no variable matches the model")
        self.say(f"{copied} variables from {directory}")
        return any(key[0] == "graph_tower" and select(key) for key in stored)

    # ------------------------------------------------------------------------------------------------ state

    def _save_frozen(self) -> None:
        """Written at a fresh start, replacing one left by an earlier start that never reached a checkpoint (every
        process saves: the Orbax write is collective)."""
        frozen_dir = self.output_dir / "frozen"
        self._remove_stale_partials(frozen_dir.name)
        model_ckpt.save_model_checkpoint(frozen_dir, self.config.model, model_ckpt.flat_values(self.program.frozen),
                                         overwrite=True,
                                         extra_metadata={"graph": dataclasses.asdict(self.config.graph),
                                                         "content": "frozen variables of a training run"})

    # ------------------------------------------------------------------------------------------------ run

    def run(self, until_step: Optional[int] = None) -> RunResult:
        """Trains to train.max_steps, or stops after `until_step` with a checkpoint (stopped_by "until_step")."""
        failed = True
        try:
            result = self._run(until_step)
            failed = False
            return result
        finally:
            self.run_directory.release(failed=failed)

    def _record_config(self, start_step: int) -> None:
        if self.process_index != 0:
            return
        save_config(self.config, self.output_dir / "config.yaml")
        if self.config_changes.applied:
            with open(self.output_dir / "config_changes.jsonl", "a") as f:
                f.write(json.dumps({"step": start_step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                    "changes": {k: list(v) for k, v in self.config_changes.applied.items()}})
                        + "\n")

    def _final_step(self) -> Optional[int]:
        """The step whose model final/ holds; None without one (or when no export is wanted)."""
        if not self.config.train.export_final:
            return None
        try:
            _, meta = model_ckpt.read_metadata(self.output_dir / "final")
        except model_ckpt.CheckpointError:
            return None
        return meta.get("source", {}).get("step")

    def _run(self, until_step: Optional[int]) -> RunResult:
        cfg = self.config
        if self.complete_at is not None:
            self._record_config(self.complete_at)
            self.checkpoints.close()
            self.say(f"the run is already complete: step {self.complete_at} of {cfg.train.max_steps}, model in "
                     f"{self.output_dir / 'final'}")
            return RunResult(self.complete_at, "already_complete", self.complete_at, self.output_dir, [])
        if self.checkpoints is None:
            self.checkpoints = self._open_checkpoints()
        state = self.program.initial_state(cfg.seed, self.mesh)
        train_step = self.program.jitted_train_step(state)
        data = self.pipeline.iterator()
        restored = self.checkpoints.restore_latest(abstract_like(state), data, warn=self.say)
        if restored is not None:
            start_step, state = restored
            state = TrainState(*state) if not isinstance(state, TrainState) else state
            self.say(f"resumed from checkpoint step {start_step}")
        else:
            start_step = 0
        self._record_config(start_step)
        if restored is None:
            self._save_frozen()
        run = RunState(state=state, data=data, start_step=start_step)
        metric_logger = (MetricLogger(self.output_dir, self.task_names, resume_step=start_step,
                                      max_steps=cfg.train.max_steps) if self.process_index == 0 else None)
        hooks = self._hooks(train_step, metric_logger, until_step)
        signal_hook = next(h for h in hooks if isinstance(h, SignalHook))
        stopped_by, step = "max_steps", start_step
        try:
            with use_mesh(self.mesh):
                for hook in hooks:
                    hook.at_start(run)
                while step < cfg.train.max_steps:
                    run.micro_batches = [next(data) for _ in range(cfg.train.grad_accum_steps)]
                    run.batch = place_micro_batches(run.micro_batches, self.mesh, process_index=self.process_index,
                                                    process_count=self.process_count)
                    for hook in hooks:
                        hook.before_step(run, step)
                    started = time.perf_counter()
                    run.state, metrics = train_step(run.state, self.program.frozen, run.batch)
                    metrics = jax.device_get(metrics)
                    run.step_seconds = time.perf_counter() - started
                    step += 1
                    # Hooks act in order; the first stop reason ends the step (no checkpoint/eval hook after it).
                    reason = next((r for r in (hook.after_step(run, step, metrics) for hook in hooks) if r), None)
                    if reason:
                        stopped_by = reason
                        break
                for hook in hooks:
                    hook.at_end(run, step, stopped_by)
        finally:
            for hook in hooks:
                hook.close(run)
            if metric_logger:
                metric_logger.close()
            data.close()
        if self.process_index == 0:
            plots = plot_run(self.output_dir, self.task_names, run.expert_usage)
            summary = {"final_step": step, "stopped_by": stopped_by, "skipped_steps": int(run.state.skipped_total),
                       "peak_flops_per_device": run.peak_flops, "peak_source": run.peak_source,
                       "plots": [str(p) for p in plots], "bad_records": data.stats.by_task(),
                       "truncated_records": data.stats.truncated_by_task()}
            overlong = data.stats.overlong_by_task()
            if overlong:
                self.say(f"over-long samples (> data.seq_len {self.config.data.seq_len}, data.overlong="
                         f"{self.config.data.overlong}): " + ", ".join(f"{t} {n}" for t, n in overlong.items()))
            (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return RunResult(step, stopped_by, step, self.output_dir, run.losses, final_state=run.state,
                         signal=signal_hook.received_number if stopped_by == "signal" else None)

    def _hooks(self, train_step, metric_logger: Optional[MetricLogger], until_step: Optional[int]) -> list[Hook]:
        """The run's hooks, in the order they act after each step (stop checks before the checkpoint)."""
        cfg = self.config.train
        return [
            CompileHook(train_step, lambda run: (run.state, self.program.frozen, run.batch), cfg.peak_flops_per_device,
                        self.say),
            ProfileHook(cfg.profile_range(), self.output_dir / "profile", self.say),
            MetricsHook(self.task_names, cfg.log_every, cfg.max_steps, metric_logger,
                        progress=self.progress and self.process_index == 0,
                        say=self.say if not self.progress and self.process_index == 0 else None),
            NonFiniteStopHook(cfg.max_consecutive_nonfinite, self.say),
            SignalHook(self.say),
            UntilStepHook(until_step),
            CheckpointHook(self.checkpoints, cfg.checkpoint_every, cfg.max_steps, self._config_dict),
            EvalHook(lambda state, step: self._log_eval(metric_logger, step, state), cfg.eval_every, cfg.max_steps),
            ExportHook(lambda state: self.export(state, self.output_dir / "final") if cfg.export_final else None),
        ]

    def _log_eval(self, logger_, step: int, state: TrainState) -> None:
        # Every process evaluates (the jitted eval step is collective over the global mesh); process 0 logs.
        scalars = self.evaluate(state.trainable)
        if logger_:
            logger_.log(step, scalars, kind="eval")

    def _config_dict(self) -> dict:
        return json.loads(json.dumps(self.config.to_dict(), default=str))

    # ------------------------------------------------------------------------------------------------ eval

    def evaluate(self, trainable) -> dict[str, float]:
        """Validation cross entropy (overall and per task) on up to train.eval_batches test batches."""
        return self.validation(trainable, self.program.frozen)

    # ------------------------------------------------------------------------------------------------ export

    def _remove_stale_partials(self, name: str) -> None:
        """Half-written `.<name>.partial-*` folders of a killed earlier attempt: this process holds the run lock, so
        no other writer can own them."""
        if self.process_index == 0:
            for stale in self.output_dir.glob(f".{name}.partial-*"):
                shutil.rmtree(stale, ignore_errors=True)

    def export(self, state: TrainState, directory: Path) -> Path:
        self._remove_stale_partials(Path(directory).name)
        model = nnx.merge(self.program.graphdef, self.program.layout.unflatten(state.trainable), self.program.frozen)
        tokenizer_dir = self.tokenizer_dir
        model_ckpt.save_omnimol_checkpoint(
            directory, self.config.model, self.config.graph, model, overwrite=True,
            extra_metadata={"source": {"kind": "training", "run": str(self.output_dir.resolve()),
                                       "step": int(state.step)},
                            "tasks": self.task_names,
                            "data": {"double_bos": self.config.data.double_bos,
                                     "chat_format": self.config.data.chat_format,
                                     "graph_tokens": self.config.data.graph_tokens}},
            assets_from=tokenizer_dir if tokenizer_dir.is_dir() else None)
        self.say(f"model checkpoint written to {directory}")
        return directory


def train(config: Config, *, progress: bool = True) -> RunResult:
    return Trainer(config, progress=progress).run()

"""`omnimol train`: stage 1 (projector alignment) or stage 2 (MoGE SFT) under jit shardings over the mesh.

A run lives in `train.output_dir`:
    config.yaml          the resolved config
    frozen/              the frozen weights, written once (model checkpoint format)
    checkpoints/<step>/  Orbax: train state (trainable params, optimizer, step, RNG, counters), data iterator, config
    metrics.jsonl, tensorboard/, loss_per_task.png, expert_usage.png, profile/ (with train.profile_steps)
    final/               the trained model as a model checkpoint (eval/generate/export read it)
Resuming (the same command again) picks the newest checkpoint that restores; stopping by SIGTERM/SIGINT
saves a checkpoint first, so preempted runs continue exactly.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import time
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from omnimol_jax import checkpoint as model_ckpt
from omnimol_jax.config import Config, save_config
from omnimol_jax.data.graphs import batch_graphs, node_mask
from omnimol_jax.data.pipeline import Pipeline, place_batch
from omnimol_jax.model.gin import mean_pairwise_cosine
from omnimol_jax.model.lora import trainable_filter
from omnimol_jax.sharding import batch_sharding, build_mesh, create_sharded_model, use_mesh
from omnimol_jax.train.batches import place_micro_batches
from omnimol_jax.train.checkpoints import RunCheckpoints, abstract_like
from omnimol_jax.train.flops import compiled_flops, device_peak_flops
from omnimol_jax.train.metrics_log import MetricLogger, per_task_scalars, plot_run
from omnimol_jax.train.step import StateLayout, TrainState, flatten_state, make_optimizer, make_step_functions, \
    model_batch

logger = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    pass


@dataclasses.dataclass
class RunResult:
    final_step: int
    stopped_by: str                  # "max_steps" | "signal" | "nonfinite" | "until_step"
    checkpoint_step: Optional[int]
    output_dir: Path
    losses: list[float]
    final_state: Any = None


class Trainer:
    def __init__(self, config: Config, *, progress: bool = True, log: Callable[[str], None] = print,
                 devices: Optional[list] = None):
        config.validate()
        self.config = config
        self.progress = progress
        self.say = log
        self.output_dir = Path(config.train.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.mesh = build_mesh(config.mesh, devices)
        self.process_index, self.process_count = jax.process_index(), jax.process_count()
        self._stop_signal: Optional[str] = None

        self.pipeline = Pipeline(config.data)
        self.task_names = list(self.pipeline.task_keys)
        self.num_tasks = len(self.task_names)
        if self.pipeline.tokenizer.vocab_size > config.model.vocab_size:
            raise TrainingError(f"the tokenizer has {self.pipeline.tokenizer.vocab_size} tokens but "
                                f"model.vocab_size is {config.model.vocab_size}")
        self._build_model()
        self.tx, self.schedule = make_optimizer(config.train)
        steps = make_step_functions(self.graphdef, self.layout, self.tx, num_tasks=self.num_tasks,
                                    aux_loss_coef=config.model.moge.aux_loss_coef,
                                    task_balanced=config.train.task_balanced_loss, schedule=self.schedule)
        self._train_step_fn = steps.train_step
        self._eval_step = jax.jit(steps.eval_step)  # once: every evaluation reuses its compilations
        self.checkpoints = RunCheckpoints(self.output_dir / "checkpoints", config.train.keep_checkpoints,
                                          config.train.async_checkpointing)

    # ------------------------------------------------------------------------------------------------ model

    def _build_model(self) -> None:
        cfg = self.config
        constructor = model_ckpt.omnimol_constructor(cfg.model, cfg.graph, seed=cfg.seed)
        model = create_sharded_model(constructor, self.mesh)
        trains = trainable_filter(cfg.train.stage, cfg.train.unfreeze)
        frozen_dir = self.output_dir / "frozen"
        if (frozen_dir / model_ckpt.META_FILE).is_file():
            self.say(f"frozen weights from {frozen_dir} (written when this run started)")
            graphdef, trainable, frozen = nnx.split(model, trains, ...)
            shardings = {k: v.sharding for k, v in model_ckpt.flat_values(frozen).items()}
            stored = model_ckpt.load_params(frozen_dir, shardings)
            for key, variable in model_ckpt.flat_variables(frozen).items():
                variable.set_value(stored[key])
            model = nnx.merge(graphdef, trainable, frozen)
        else:
            self._initialise_weights(model)
        graphdef, trainable, frozen = nnx.split(model, trains, ...)
        self.graphdef, self.frozen = graphdef, frozen
        self.layout = StateLayout.of(trainable)
        self.initial_trainable = flatten_state(trainable)
        n_train = sum(x.size for x in jax.tree.leaves(self.initial_trainable))
        n_frozen = sum(x.size for x in jax.tree.leaves(frozen))
        self.say(f"parameters: {n_train:,} trainable, {n_frozen:,} frozen (stage {cfg.train.stage})")
        if n_train == 0:
            raise TrainingError("no trainable parameters: stage 2 needs model.lora.enabled or model.moge.enabled, "
                                "stage 1 trains the projector")

    def _initialise_weights(self, model) -> None:
        init = self.config.init
        tower_loaded = False
        if init.hf:
            from omnimol_jax.convert.hf_llama import load_hf_weights

            load_hf_weights(model.language_model, init.hf, progress=self.progress)
            self.say(f"language model weights from {init.hf}")
        if init.checkpoint:
            tower_loaded = self._load_matching(model, init.checkpoint, lambda key: True)
        if init.moleculestm:
            from omnimol_jax.convert.moleculestm import load_moleculestm

            load_moleculestm(model.graph_tower, init.moleculestm)
            tower_loaded = True
            self.say(f"graph tower weights from {init.moleculestm}")
        if init.projector:
            self._load_matching(model, init.projector, lambda key: key[0] == "projector")
        if not tower_loaded and self.config.graph.calibration_graphs > 0:
            self._calibrate_graph_tower(model)

    def _calibrate_graph_tower(self, model) -> None:
        """Batch-norm statistics of a random graph tower from training graphs (see GIN.calibrate_batch_norms)."""
        from omnimol_jax.inference.decoding import prompt_graph_budget

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

    def _initial_state(self) -> TrainState:
        trainable = self.initial_trainable
        with use_mesh(self.mesh):
            opt_state = self.tx.init(trainable)
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        scalar = lambda v: jax.device_put(jnp.asarray(v, jnp.int32), replicated)  # noqa: E731
        rng = jax.device_put(jax.random.key_data(jax.random.key(self.config.seed)), replicated)
        opt_state = jax.tree.map(lambda x: x if getattr(x, "ndim", 0) else jax.device_put(x, replicated), opt_state)
        return TrainState(step=scalar(0), trainable=trainable, opt_state=opt_state, rng=rng,
                          nonfinite_in_a_row=scalar(0), skipped_total=scalar(0))

    def _save_frozen_once(self) -> None:
        frozen_dir = self.output_dir / "frozen"
        if (frozen_dir / model_ckpt.META_FILE).is_file():
            return  # (every process saves: the Orbax write is collective)
        model_ckpt.save_model_checkpoint(frozen_dir, self.config.model, model_ckpt.flat_values(self.frozen),
                                         overwrite=True,
                                         extra_metadata={"graph": dataclasses.asdict(self.config.graph),
                                                         "content": "frozen variables of a training run"})

    # ------------------------------------------------------------------------------------------------ run

    def _request_stop(self, signum, frame) -> None:
        self._stop_signal = signal.Signals(signum).name
        self.say(f"received {self._stop_signal}: saving a checkpoint after this step")

    def run(self, until_step: Optional[int] = None) -> RunResult:
        """Trains to train.max_steps, or stops after `until_step` with a checkpoint (stopped_by "until_step")."""
        cfg = self.config
        save_config(cfg, self.output_dir / "config.yaml")
        state = self._initial_state()
        state_shardings = jax.tree.map(lambda x: x.sharding, state)
        frozen_shardings = jax.tree.map(lambda x: x.sharding, self.frozen)
        data = self.pipeline.iterator()

        restored = self.checkpoints.restore_latest(abstract_like(state), data, warn=self.say)
        if restored is not None:
            start_step, state = restored
            state = TrainState(*state) if not isinstance(state, TrainState) else state
            self.say(f"resumed from checkpoint step {start_step}")
        else:
            start_step = 0
            self._save_frozen_once()

        train_step = jax.jit(self._train_step_fn, in_shardings=(state_shardings, frozen_shardings, None),
                             out_shardings=(state_shardings, None), donate_argnums=(0,))
        logger_ = MetricLogger(self.output_dir, self.task_names) if self.process_index == 0 else None
        previous = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        profile = cfg.train.profile_range()
        tracing = False
        losses: list[float] = []
        stopped_by, step = "max_steps", start_step
        window = _Window(self.num_tasks)
        expert_usage = None
        flops_per_step, peak, peak_source = 0.0, None, ""
        if start_step == 0 and cfg.train.eval_every:
            self._log_eval(logger_, 0, state)  # where the validation curve starts
        bar = tqdm(total=cfg.train.max_steps, initial=start_step, desc="train", unit="step",
                   disable=not self.progress or self.process_index != 0)
        try:
            with use_mesh(self.mesh):
                while step < cfg.train.max_steps:
                    micro = [next(data) for _ in range(cfg.train.grad_accum_steps)]
                    batch = place_micro_batches(micro, self.mesh, process_index=self.process_index,
                                                process_count=self.process_count)
                    if step == start_step:
                        start = time.perf_counter()
                        compiled = train_step.lower(state, self.frozen, batch).compile()
                        flops_per_step = compiled_flops(compiled)
                        peak, peak_source = device_peak_flops(cfg.train.peak_flops_per_device)
                        self.say(f"compiled the train step in {time.perf_counter() - start:.1f}s "
                                 f"({flops_per_step / 1e9:.2f} GFLOP per step and device)")
                    if profile and step == profile[0]:
                        jax.profiler.start_trace(str(self.output_dir / "profile"))
                        tracing = True
                    started = time.perf_counter()
                    state, metrics = train_step(state, self.frozen, batch)
                    metrics = jax.device_get(metrics)
                    elapsed = time.perf_counter() - started
                    step += 1
                    if tracing and step == profile[1]:
                        jax.profiler.stop_trace()
                        tracing = False
                        self.say(f"profile of steps {profile[0]}..{profile[1] - 1} in {self.output_dir / 'profile'}")
                    real_tokens = int(sum(np.asarray(b["attention_mask"]).sum() for b in micro))
                    window.add(metrics, real_tokens, elapsed)
                    if "router_task_assignments" in metrics:
                        usage = np.asarray(metrics["router_task_assignments"])
                        expert_usage = usage if expert_usage is None else expert_usage + usage
                    if bool(metrics["finite"]):
                        losses.append(float(metrics["loss"]))
                    bar.update(1)
                    bar.set_postfix(loss=f"{float(metrics['loss']):.4f}",
                                    tok_s=f"{real_tokens / max(elapsed, 1e-9):.0f}")
                    if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
                        scalars = window.flush(self.task_names, flops_per_step, peak or 0.0, metrics)
                        if logger_:
                            logger_.log(step, scalars)
                    if int(jax.device_get(state.nonfinite_in_a_row)) >= cfg.train.max_consecutive_nonfinite:
                        stopped_by = "nonfinite"
                        self.say(f"{cfg.train.max_consecutive_nonfinite} non-finite steps in a row at step {step}: "
                                 "stopping with a checkpoint of the last finite state")
                        break
                    if self._stop_signal:
                        stopped_by = "signal"
                        break
                    if until_step is not None and step >= until_step:
                        stopped_by = "until_step"
                        break
                    if step % cfg.train.checkpoint_every == 0 and step < cfg.train.max_steps:
                        self.checkpoints.save(step, state, data, self._config_dict())
                    if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.max_steps:
                        self._log_eval(logger_, step, state)
                self.checkpoints.save(step, state, data, self._config_dict(), force=True)
                self.checkpoints.wait()
                if stopped_by == "max_steps":
                    self._log_eval(logger_, step, state)
                    if cfg.train.export_final:
                        self.export(state, self.output_dir / "final")
        finally:
            if tracing:  # stopped (signal, NaNs, until_step) inside the profiled range: keep what was traced
                jax.profiler.stop_trace()
            bar.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if logger_:
                logger_.close()
            self.checkpoints.close()
            data.close() if hasattr(data, "close") else None
        if self.process_index == 0:
            plots = plot_run(self.output_dir, self.task_names, expert_usage)
            summary = {"final_step": step, "stopped_by": stopped_by, "skipped_steps": int(state.skipped_total),
                       "peak_flops_per_device": peak, "peak_source": peak_source,
                       "plots": [str(p) for p in plots], "bad_records": data.stats.by_task()
                       if hasattr(data, "stats") else {}}
            (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return RunResult(step, stopped_by, step, self.output_dir, losses, final_state=state)

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
        cfg = self.config
        # A fixed-seed shuffle: every evaluation sees the same batches, drawn from all tasks (the test stream
        # itself is ordered task by task).
        eval_data = dataclasses.replace(cfg.data, split="test", shuffle=True, seed=cfg.data.seed + 1, num_epochs=1,
                                        prefetch_batches=0)
        try:
            pipeline = Pipeline(eval_data, tokenizer=self.pipeline.tokenizer)
        except (ValueError, FileNotFoundError, KeyError) as err:
            self.say(f"validation skipped: {err}")
            return {}
        iterator = pipeline.iterator()
        sums, counts = np.zeros(self.num_tasks), np.zeros(self.num_tasks)
        total, tokens = 0.0, 0.0
        index = {name: i for i, name in enumerate(self.task_names)}
        remap = np.array([index.get(name, -1) for name in pipeline.task_keys] + [-1], np.int32)
        for _ in range(cfg.train.eval_batches):
            try:
                host = next(iterator)
            except StopIteration:
                break
            # the eval pipeline numbers its tasks itself; map them onto the training task ids
            host = dict(host, token_task_ids=remap[host["token_task_ids"]])
            batch = place_batch(model_batch(host), batch_sharding(self.mesh), process_index=self.process_index,
                                process_count=self.process_count)
            out = jax.device_get(self._eval_step(trainable, self.frozen, batch))
            sums += out["task_ce_sum"]
            counts += out["task_tokens"]
            total += float(out["ce_sum"])
            tokens += float(out["tokens"])
        if hasattr(iterator, "close"):
            iterator.close()
        scalars = {"loss": total / max(tokens, 1.0), "supervised_tokens": tokens}
        scalars.update(per_task_scalars("task_loss", self.task_names, sums, counts))
        return scalars

    # ------------------------------------------------------------------------------------------------ export

    def export(self, state: TrainState, directory: Path) -> Path:
        model = nnx.merge(self.graphdef, self.layout.unflatten(state.trainable), self.frozen)
        tokenizer_dir = self.config.data.tokenizer_path()
        model_ckpt.save_omnimol_checkpoint(
            directory, self.config.model, self.config.graph, model, overwrite=True,
            extra_metadata={"source": {"kind": "training", "run": str(self.output_dir.resolve()),
                                       "step": int(state.step)},
                            "tasks": self.task_names,
                            "data": {"double_bos": self.config.data.double_bos,
                                     "feature_mode": self.config.data.feature_mode}},
            assets_from=tokenizer_dir if tokenizer_dir.is_dir() else None)
        self.say(f"model checkpoint written to {directory}")
        return directory


class _Window:
    """Accumulates metrics between two log points."""

    def __init__(self, num_tasks: int):
        self.num_tasks = num_tasks
        self.reset()

    def reset(self) -> None:
        self.steps, self.tokens, self.seconds = 0, 0, 0.0
        self.losses, self.task_sums, self.task_counts = [], np.zeros(self.num_tasks), np.zeros(self.num_tasks)
        self.skipped = 0

    def add(self, metrics: dict, tokens: int, seconds: float) -> None:
        self.steps += 1
        self.tokens += tokens
        self.seconds += seconds
        if bool(metrics["finite"]):
            self.losses.append(float(metrics["loss"]))
            self.task_sums += np.asarray(metrics["task_ce_sum"])
            self.task_counts += np.asarray(metrics["task_tokens"])
        else:
            self.skipped += 1

    def flush(self, task_names, flops_per_step: float, peak: float, last: dict) -> dict[str, float]:
        step_time = self.seconds / max(self.steps, 1)
        scalars = {
            "loss": float(np.mean(self.losses)) if self.losses else math.nan,
            "ce": float(last["ce"]), "aux_loss": float(last["aux_loss"]), "grad_norm": float(last["grad_norm"]),
            "learning_rate": float(last["learning_rate"]), "tokens_per_s": self.tokens / max(self.seconds, 1e-9),
            "step_time_s": step_time, "skipped_steps": self.skipped,
            "mfu": flops_per_step / step_time / peak if peak and flops_per_step else math.nan,
        }
        scalars.update(per_task_scalars("task_loss", task_names, self.task_sums, self.task_counts))
        if "router_load" in last:
            for layer, loads in enumerate(np.asarray(last["router_load"])):
                for expert, load in enumerate(loads):
                    scalars[f"router_load/layer{layer}/expert{expert}"] = float(load)
        self.reset()
        return scalars


def train(config: Config, *, progress: bool = True) -> RunResult:
    return Trainer(config, progress=progress).run()

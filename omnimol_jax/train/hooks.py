"""What happens around the train step, one hook per concern: profiling, metrics, stop conditions, checkpoints,
validation, export. `Trainer.run` calls them in list order; each can be read and tested alone.

A hook may implement any of:
    at_start(run)                       once, before the first step
    before_step(run, step)              step: the number of steps done so far (the step's batch is placed)
    after_step(run, step, metrics)      step: steps done, this one included; returns a stop reason or None
    at_end(run, step, stopped_by)       after the loop, for a run that did not fail
    close(run)                          always, last (release files, signal handlers, profiler)
`run` is the Trainer's `RunState`: the live train state, the data iterator and what the hooks share.
"""
from __future__ import annotations

import dataclasses
import math
import signal
import time
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import numpy as np
from tqdm.auto import tqdm

from omnimol_jax.train.flops import device_peak_flops, step_costs
from omnimol_jax.train.metrics_log import MetricLogger, per_task_scalars


@dataclasses.dataclass
class RunState:
    """What the loop and its hooks share during one `Trainer.run`."""

    state: Any                       # TrainState, replaced after every step
    data: Any                        # the DataIterator (checkpointed with the state)
    start_step: int
    micro_batches: list = dataclasses.field(default_factory=list)  # host batches of the current step
    batch: Any = None                # the same, placed on the devices
    step_seconds: float = 0.0
    losses: list[float] = dataclasses.field(default_factory=list)
    flops_per_step: float = 0.0
    peak_flops: Optional[float] = None
    peak_source: str = ""
    expert_usage: Optional[np.ndarray] = None


class Hook:
    def at_start(self, run: RunState) -> None:
        pass

    def before_step(self, run: RunState, step: int) -> None:
        pass

    def after_step(self, run: RunState, step: int, metrics: dict) -> Optional[str]:
        return None

    def at_end(self, run: RunState, step: int, stopped_by: str) -> None:
        pass

    def close(self, run: RunState) -> None:
        pass


class CompileHook(Hook):
    """Compiles the step ahead of its first call, to report the compile time and the FLOPs per step (for MFU)."""

    def __init__(self, step: Callable, arguments: Callable[[RunState], tuple], peak_flops_per_device: float,
                 say: Callable[[str], None]):
        self.step, self.arguments, self.peak_flops_per_device, self.say = step, arguments, peak_flops_per_device, say

    def before_step(self, run: RunState, step: int) -> None:
        if step != run.start_step:
            return
        start = time.perf_counter()
        args = self.arguments(run)
        lowered = self.step.lower(*args)
        compiled = lowered.compile()
        seconds = time.perf_counter() - start
        run.flops_per_step, _ = step_costs(compiled, lowered, self.step.__wrapped__, *args)
        run.peak_flops, run.peak_source = device_peak_flops(self.peak_flops_per_device)
        self.say(f"compiled the train step in {seconds:.1f}s "
                 f"({run.flops_per_step / 1e9:.2f} GFLOP per step and device)")


class ProfileHook(Hook):
    """A jax.profiler trace of steps [start, stop) (train.profile_steps), written under `directory`."""

    def __init__(self, steps: Optional[tuple[int, int]], directory: Path, say: Callable[[str], None]):
        self.steps, self.directory, self.say = steps, directory, say
        self.tracing = False

    def before_step(self, run: RunState, step: int) -> None:
        if self.steps and step == self.steps[0]:
            jax.profiler.start_trace(str(self.directory))
            self.tracing = True

    def after_step(self, run: RunState, step: int, metrics: dict) -> Optional[str]:
        if self.tracing and step == self.steps[1]:
            jax.profiler.stop_trace()
            self.tracing = False
            self.say(f"profile of steps {self.steps[0]}..{self.steps[1] - 1} in {self.directory}")
        return None

    def close(self, run: RunState) -> None:
        if self.tracing:  # stopped (signal, NaNs, until_step) inside the profiled range: keep what was traced
            jax.profiler.stop_trace()
            self.tracing = False


class MetricsHook(Hook):
    """Losses, throughput, MFU and router load: a progress bar every step, the metric log every `log_every`, and
    (`say`, for runs without a progress bar) a line per log point."""

    def __init__(self, task_names: list[str], log_every: int, max_steps: int, logger: Optional[MetricLogger],
                 progress: bool, say: Optional[Callable[[str], None]] = None):
        self.task_names, self.log_every, self.max_steps, self.logger = task_names, log_every, max_steps, logger
        self.window = MetricWindow(len(task_names))
        self.progress = progress
        self.say = say
        self.bar = None

    def at_start(self, run: RunState) -> None:
        self.bar = tqdm(total=self.max_steps, initial=run.start_step, desc="train", unit="step",
                        disable=not self.progress)

    def after_step(self, run: RunState, step: int, metrics: dict) -> Optional[str]:
        real_tokens = int(sum(np.asarray(b["attention_mask"]).sum() for b in run.micro_batches))
        self.window.add(metrics, real_tokens, run.step_seconds)
        if "router_task_assignments" in metrics:
            usage = np.asarray(metrics["router_task_assignments"])
            run.expert_usage = usage if run.expert_usage is None else run.expert_usage + usage
        if bool(metrics["finite"]):
            run.losses.append(float(metrics["loss"]))
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{float(metrics['loss']):.4f}",
                             tok_s=f"{real_tokens / max(run.step_seconds, 1e-9):.0f}")
        if step % self.log_every == 0 or step == self.max_steps:
            scalars = self.window.flush(self.task_names, run.flops_per_step, run.peak_flops or 0.0, metrics)
            if self.logger:
                self.logger.log(step, scalars)
            if self.say:
                self.say(f"step {step}/{self.max_steps}: loss {scalars['loss']:.4f}, grad norm "
                         f"{scalars['grad_norm']:.3g}, lr {scalars['learning_rate']:.3g}, "
                         f"{scalars['tokens_per_s']:.0f} tokens/s"
                         + (f", {scalars['skipped_steps']} skipped" if scalars["skipped_steps"] else ""))
        return None

    def close(self, run: RunState) -> None:
        if self.bar is not None:
            self.bar.close()


class NonFiniteStopHook(Hook):
    """Stops the run after `limit` non-finite (skipped) updates in a row."""

    def __init__(self, limit: int, say: Callable[[str], None]):
        self.limit, self.say = limit, say

    def after_step(self, run: RunState, step: int, metrics: dict) -> Optional[str]:
        if int(jax.device_get(run.state.nonfinite_in_a_row)) >= self.limit:
            self.say(f"{self.limit} non-finite steps in a row at step {step}: "
                     "stopping with a checkpoint of the last finite state")
            return "nonfinite"
        return None


class SignalHook(Hook):
    """SIGTERM / SIGINT ask for a stop after the current step (then the checkpoint hook saves)."""

    def __init__(self, say: Callable[[str], None]):
        self.say = say
        self.received: Optional[str] = None
        self.received_number: Optional[int] = None
        self.previous = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _request_stop(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name
        self.received_number = int(signum)
        self.say(f"received {self.received}: saving a checkpoint after this step")

    def after_step(self, run: RunState, step: int, metrics: dict) -> Optional[str]:
        return "signal" if self.received else None

    def close(self, run: RunState) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class UntilStepHook(Hook):
    """Stops (with a checkpoint) after a given step: `Trainer.run(until_step=...)`, used by tests of resume."""

    def __init__(self, until_step: Optional[int]):
        self.until_step = until_step

    def after_step(self, run: RunState, step: int, metrics: dict) -> Optional[str]:
        return "until_step" if self.until_step is not None and step >= self.until_step else None


class CheckpointHook(Hook):
    """Saves every `every` steps before the last, and once more, forced, at the end however the run stopped (a
    step that already has a checkpoint, as after a rerun of a finished run, is not saved again)."""

    def __init__(self, checkpoints: Any, every: int, max_steps: int, config_dict: Callable[[], dict]):
        self.checkpoints, self.every, self.max_steps, self.config_dict = checkpoints, every, max_steps, config_dict

    def after_step(self, run: RunState, step: int, metrics: dict) -> Optional[str]:
        if step % self.every == 0 and step < self.max_steps:
            self.checkpoints.save(step, run.state, run.data, self.config_dict())
        return None

    def at_end(self, run: RunState, step: int, stopped_by: str) -> None:
        self.checkpoints.save(step, run.state, run.data, self.config_dict(), force=True)
        self.checkpoints.wait()

    def close(self, run: RunState) -> None:
        self.checkpoints.close()


class EvalHook(Hook):
    """Validation loss at step 0 (fresh runs), every `every` steps and at the end of a finished run."""

    def __init__(self, evaluate: Callable[[Any, int], None], every: int, max_steps: int):
        self.evaluate, self.every, self.max_steps = evaluate, every, max_steps

    def at_start(self, run: RunState) -> None:
        if run.start_step == 0 and self.every:
            self.evaluate(run.state, 0)  # where the validation curve starts

    def after_step(self, run: RunState, step: int, metrics: dict) -> Optional[str]:
        if self.every and step % self.every == 0 and step < self.max_steps:
            self.evaluate(run.state, step)
        return None

    def at_end(self, run: RunState, step: int, stopped_by: str) -> None:
        if stopped_by == "max_steps":
            self.evaluate(run.state, step)


class ExportHook(Hook):
    """The trained model as a model checkpoint (`final/`) when the run reached max_steps."""

    def __init__(self, export: Callable[[Any], Any]):
        self.export = export

    def at_end(self, run: RunState, step: int, stopped_by: str) -> None:
        if stopped_by == "max_steps":
            self.export(run.state)


class MetricWindow:
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

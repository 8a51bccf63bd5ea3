"""Train-loop hooks, each alone, with fakes in place of the trainer's parts."""
import math
import signal

import numpy as np

from omnimol_jax.train.hooks import (
    CheckpointHook,
    EvalHook,
    ExportHook,
    MetricsHook,
    MetricWindow,
    NonFiniteStopHook,
    RunState,
    SignalHook,
    UntilStepHook,
)


class FakeCheckpoints:
    def __init__(self):
        self.saved, self.waited, self.closed = [], 0, False

    def save(self, step, state, data, config, force=False):
        self.saved.append((step, force))

    def wait(self):
        self.waited += 1

    def close(self):
        self.closed = True


class FakeState:
    def __init__(self, nonfinite=0):
        self.nonfinite_in_a_row = np.int32(nonfinite)


def run_state(start_step=0, **kw):
    return RunState(state=FakeState(**kw), data=None, start_step=start_step)


def test_checkpoints_every_n_steps_before_the_last_then_forced_at_the_end():
    ckpt = FakeCheckpoints()
    hook = CheckpointHook(ckpt, every=2, max_steps=6, config_dict=dict)
    run = run_state()
    for step in range(1, 7):
        assert hook.after_step(run, step, {}) is None
    hook.at_end(run, 6, "max_steps")
    hook.close(run)
    assert ckpt.saved == [(2, False), (4, False), (6, True)] and ckpt.waited == 1 and ckpt.closed


def test_eval_at_start_every_n_and_at_the_end_of_a_finished_run_only():
    calls = []
    hook = EvalHook(lambda state, step: calls.append(step), every=3, max_steps=7)
    run = run_state()
    hook.at_start(run)
    for step in range(1, 8):
        hook.after_step(run, step, {})
    hook.at_end(run, 7, "max_steps")
    assert calls == [0, 3, 6, 7]
    resumed, calls[:] = run_state(start_step=3), []
    hook.at_start(resumed)  # a resumed run has its step-0 point already
    hook.at_end(resumed, 5, "signal")  # not finished: no final evaluation
    assert calls == []


def test_stop_conditions():
    say = []
    assert NonFiniteStopHook(3, say.append).after_step(run_state(nonfinite=2), 5, {}) is None
    assert NonFiniteStopHook(3, say.append).after_step(run_state(nonfinite=3), 5, {}) == "nonfinite"
    assert "3 non-finite steps in a row at step 5" in say[0]
    assert UntilStepHook(None).after_step(run_state(), 10, {}) is None
    assert UntilStepHook(4).after_step(run_state(), 3, {}) is None
    assert UntilStepHook(4).after_step(run_state(), 4, {}) == "until_step"


def test_signal_hook_asks_for_a_stop_and_restores_the_handlers():
    before = signal.getsignal(signal.SIGTERM)
    hook = SignalHook(lambda message: None)
    assert hook.after_step(run_state(), 1, {}) is None
    signal.raise_signal(signal.SIGTERM)
    assert hook.after_step(run_state(), 2, {}) == "signal"
    hook.close(run_state())
    assert signal.getsignal(signal.SIGTERM) == before


def test_export_only_after_a_finished_run():
    exported = []
    hook = ExportHook(exported.append)
    hook.at_end(run_state(), 3, "signal")
    hook.at_end(run_state(), 5, "max_steps")
    assert len(exported) == 1


def metrics(loss, finite=True, task_ce=(0.0, 0.0), task_tokens=(0.0, 0.0)):
    return {"loss": loss, "finite": finite, "task_ce_sum": np.array(task_ce), "task_tokens": np.array(task_tokens),
            "ce": loss, "aux_loss": 0.5, "grad_norm": 2.0, "learning_rate": 1e-3,
            "router_load": np.array([[0.25, 0.75]])}


def test_metric_window_averages_between_log_points():
    window = MetricWindow(num_tasks=2)
    window.add(metrics(2.0, task_ce=(4.0, 0.0), task_tokens=(2.0, 0.0)), tokens=100, seconds=1.0)
    window.add(metrics(float("nan"), finite=False), tokens=50, seconds=0.5)
    window.add(metrics(4.0, task_ce=(2.0, 6.0), task_tokens=(2.0, 3.0)), tokens=150, seconds=1.5)
    scalars = window.flush(["forward", "logp"], flops_per_step=10.0, peak=5.0, last=metrics(4.0))
    assert scalars["loss"] == 3.0 and scalars["skipped_steps"] == 1
    assert scalars["tokens_per_s"] == 100.0 and scalars["step_time_s"] == 1.0
    assert scalars["mfu"] == 2.0  # 10 FLOP per 1 s step against a 5 FLOP/s peak
    assert scalars["task_loss/forward"] == 1.5 and scalars["task_loss/logp"] == 2.0
    assert scalars["router_load/layer0/expert1"] == 0.75
    assert math.isnan(MetricWindow(2).flush(["a", "b"], 0.0, 0.0, metrics(1.0))["loss"])


def test_metrics_hook_logs_every_n_steps_and_at_the_last():
    logged = []

    class Logger:
        def log(self, step, scalars):
            logged.append((step, scalars["loss"]))

    hook = MetricsHook(["forward", "logp"], log_every=2, max_steps=5, logger=Logger(), progress=False)
    run = run_state()
    run.micro_batches = [{"attention_mask": np.ones((2, 4))}]
    hook.at_start(run)
    for step in range(1, 6):
        hook.after_step(run, step, metrics(float(step)))
    hook.close(run)
    assert logged == [(2, 1.5), (4, 3.5), (5, 5.0)] and run.losses == [1.0, 2.0, 3.0, 4.0, 5.0]

"""The train program of a model and a recipe: which variables train, the flat layout of the trained ones, the
optimizer, the step functions and the state at step 0.

The trainer, `omnimol compile`, the benchmarks and the tests all build it here, so a field added to the train state
(train/step.py's TrainState) is initialised in one place, eagerly (`initial_state`) and abstractly for AOT
compilation (`abstract_state`).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from omnimol_jax.config import Config
from omnimol_jax.sharding import use_mesh
from omnimol_jax.train.recipes import run_trainable_filter
from omnimol_jax.train.step import (
    Flat,
    StateLayout,
    StepFunctions,
    TrainState,
    flatten_state,
    jit_train_step,
    make_optimizer,
    make_step_functions,
)


@dataclasses.dataclass(frozen=True)
class TrainProgram:
    graphdef: Any
    layout: StateLayout
    trainable: Flat                  # the trained variables, flat (arrays; ShapeDtypeStructs for AOT)
    frozen: nnx.State                # everything else: passed to the step, never updated
    tx: optax.GradientTransformation
    schedule: Callable
    steps: StepFunctions

    def initial_state(self, seed: int = 0, mesh: Optional[jax.sharding.Mesh] = None,
                      trainable: Optional[Flat] = None) -> TrainState:
        """Step 0 with `trainable` (default: the model's): the optimizer state laid out like its parameters, the
        step, the counters and the RNG key replicated over `mesh` (left where jax puts them without one)."""
        trainable = self.trainable if trainable is None else trainable
        with use_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            opt_state = self.tx.init(trainable)
        zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731 - one buffer per field: the state is donated
        state = TrainState(step=zero(), trainable=trainable, opt_state=opt_state,
                           rng=jax.random.key_data(jax.random.key(seed)), nonfinite_in_a_row=zero(),
                           skipped_total=zero())
        if mesh is None:
            return state
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        put = lambda x: jax.device_put(x, replicated)  # noqa: E731
        counters = {name: put(getattr(state, name)) for name in ("step", "rng", "nonfinite_in_a_row", "skipped_total")}
        return state._replace(**counters,
                              opt_state=jax.tree.map(lambda x: x if getattr(x, "ndim", 0) else put(x), opt_state))

    def abstract_state(self, mesh: jax.sharding.Mesh) -> TrainState:
        """initial_state's shapes, dtypes and shardings, allocating nothing (`trainable` must carry shardings)."""
        with use_mesh(mesh):
            # The optimizer state is laid out as the eager tx.init lays it out: like its parameters.
            init = jax.jit(self.tx.init).lower(self.trainable).compile()
            opt_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                     jax.eval_shape(self.tx.init, self.trainable), init.output_shardings)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
        key = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
        return TrainState(step=scalar, trainable=self.trainable, opt_state=opt_state,
                          rng=jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated),
                          nonfinite_in_a_row=scalar, skipped_total=scalar)

    def jitted_train_step(self, state: TrainState):
        """The train step as the trainer runs it: the shardings of `state` and of the frozen weights, the state
        donated."""
        return jit_train_step(self.steps.train_step, jax.tree.map(lambda x: x.sharding, state),
                              jax.tree.map(lambda x: x.sharding, self.frozen))


def build_train_program(model: nnx.Module, trains, tx: optax.GradientTransformation, schedule: Callable, *,
                        num_tasks: int, aux_loss_coef: float = 0.0, task_balanced: bool = False,
                        loss_chunk: int = 0) -> TrainProgram:
    """The program for `model` with the parameters `trains` selects (an nnx filter) trained by `tx`."""
    graphdef, trainable, frozen = nnx.split(model, trains, ...)
    layout = StateLayout.of(trainable)
    steps = make_step_functions(graphdef, layout, tx, num_tasks=num_tasks, aux_loss_coef=aux_loss_coef,
                                task_balanced=task_balanced, schedule=schedule, loss_chunk=loss_chunk)
    return TrainProgram(graphdef, layout, flatten_state(trainable), frozen, tx, schedule, steps)


def run_train_program(model: nnx.Module, config: Config, num_tasks: int) -> TrainProgram:
    """The program a run config asks for: its stage's trained set, its optimizer and loss settings."""
    tx, schedule = make_optimizer(config.train)
    return build_train_program(model, run_trainable_filter(config), tx, schedule, num_tasks=num_tasks,
                               aux_loss_coef=config.model.moge.aux_loss_coef,
                               task_balanced=config.train.task_balanced_loss, loss_chunk=config.train.loss_chunk)

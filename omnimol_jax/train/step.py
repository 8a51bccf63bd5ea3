"""The jitted train and eval steps.

Parameters are split once into trainable (a flat dict `path -> array`: what the optimizer, the gradients and
the checkpoints see) and frozen (an nnx State that is never differentiated, updated or copied). A train step
takes `grad_accum_steps` stacked micro-batches, scans over them accumulating gradients of an exact token-mean
cross entropy, adds the MoGE aux loss, clips, applies AdamW, and skips the update (keeping parameters and
optimizer state) when the loss or the gradient norm is not finite.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from omnimol_jax import loops
from omnimol_jax.checkpoint import path_text
from omnimol_jax.constants import IGNORE_INDEX

Flat = dict[str, jax.Array]
# optax.tree.norm replaces the deprecated optax.global_norm (older optax has only the latter)
_global_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm


def flatten_state(state: nnx.State) -> Flat:
    """The state's arrays keyed by `path_text` (Orbax stores the train state as a string-keyed dict)."""
    return {path_text(path): variable.get_value() for path, variable in nnx.to_flat_state(state)}


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """How a flat dict maps back onto an nnx State of fixed structure (keys in leaf order)."""

    treedef: Any
    keys: tuple[str, ...]

    @classmethod
    def of(cls, state: nnx.State) -> "StateLayout":
        keys = tuple(path_text(path) for path, _ in nnx.to_flat_state(state))
        leaves, treedef = jax.tree.flatten(state)
        if len(leaves) != len(keys):
            raise ValueError("state leaves and paths disagree; cannot build a flat layout")
        return cls(treedef, keys)

    def unflatten(self, flat: Flat) -> nnx.State:
        return jax.tree.unflatten(self.treedef, [flat[k] for k in self.keys])


class TrainState(NamedTuple):
    step: jax.Array                 # int32: optimizer steps taken (skipped ones included)
    trainable: Flat
    opt_state: Any
    rng: jax.Array                  # uint32 key data (a raw array, so that checkpoints store it plainly)
    nonfinite_in_a_row: jax.Array   # int32
    skipped_total: jax.Array        # int32


def token_losses(model: nnx.Module, batch: dict, dropout_rng, loss_chunk: int = 0):
    """Per-token CE on next-token targets, its mask and task ids, and the model's aux outputs.

    loss_chunk > 0: the output head and CE run `loss_chunk` positions at a time (LlamaForCausalLM.
    chunked_cross_entropy), so the full [B, S, vocab] logits are never formed (XLA drops the unused ones)."""
    out = model(batch["input_ids"], batch["graphs"], positions=batch["positions"],
                attention_mask=batch["attention_mask"], segment_ids=batch["segment_ids"], dropout_rng=dropout_rng,
                return_hidden_states=loss_chunk > 0)
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    targets = jnp.where(mask, labels, 0)
    if loss_chunk > 0:
        language_model = getattr(model, "language_model", model)
        ce = language_model.chunked_cross_entropy(out.hidden_states[:, :-1], targets, loss_chunk)
    else:
        ce = optax.softmax_cross_entropy_with_integer_labels(out.logits[:, :-1].astype(jnp.float32), targets)
    ce = jnp.where(mask, ce, 0.0)
    tasks = jnp.where(mask, batch["token_task_ids"][:, 1:], -1)
    return ce, mask, tasks, out.aux


def per_task_sums(ce, mask, tasks, num_tasks: int):
    """(sum of CE, number of supervised tokens) per task id; -1 (padding) is dropped."""
    ids = jnp.where(tasks >= 0, tasks, num_tasks).reshape(-1)
    sums = jax.ops.segment_sum(ce.reshape(-1), ids, num_segments=num_tasks + 1)[:num_tasks]
    counts = jax.ops.segment_sum(mask.reshape(-1).astype(jnp.float32), ids, num_segments=num_tasks + 1)[:num_tasks]
    return sums, counts


def router_assignments_by_task(assignments: jax.Array, token_task_ids: jax.Array, num_tasks: int) -> jax.Array:
    """[L, T, E]: expert assignments of each task's tokens per MoE layer, from the model's per-token telemetry
    (`router_assignments` [L, B * S, E]; padding tokens carry none)."""
    ids = jnp.maximum(token_task_ids, 0).reshape(-1)
    return jax.vmap(lambda a: jax.ops.segment_sum(a, ids, num_segments=num_tasks))(assignments)


@dataclasses.dataclass(frozen=True)
class StepFunctions:
    train_step: Callable
    eval_step: Callable


def make_step_functions(graphdef, layout: StateLayout, tx: optax.GradientTransformation, *, num_tasks: int,
                        aux_loss_coef: float, task_balanced: bool, schedule: Callable,
                        loss_chunk: int = 0) -> StepFunctions:
    """Pure step functions; the trainer jits them with explicit shardings. loss_chunk: see token_losses."""

    def merge(trainable: Flat, frozen):
        return nnx.merge(graphdef, layout.unflatten(trainable), frozen)

    def train_step(state: TrainState, frozen, micro_batches: dict):
        num_micro = micro_batches["input_ids"].shape[0]
        total_tokens = jnp.maximum(jnp.sum(micro_batches["labels"][:, :, 1:] != IGNORE_INDEX), 1)
        rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))

        def micro_loss(trainable, batch, micro_rng):
            ce, mask, tasks, aux = token_losses(merge(trainable, frozen), batch, micro_rng, loss_chunk)
            task_sums, task_counts = per_task_sums(ce, mask, tasks, num_tasks)
            if task_balanced:
                present = task_counts > 0
                task_loss = task_sums / jnp.maximum(task_counts, 1.0)
                balanced = jnp.where(present, task_loss / jax.lax.stop_gradient(task_loss + 1e-5), 0.0)
                objective = balanced.sum() / jnp.maximum(present.sum(), 1) / num_micro
            else:
                objective = ce.sum() / total_tokens
            aux_loss = aux["aux_loss"].sum() if "aux_loss" in aux else jnp.zeros((), jnp.float32)
            objective = objective + aux_loss_coef * aux_loss / num_micro
            stats = {"ce_sum": ce.sum(), "aux_loss": aux_loss, "task_sums": task_sums, "task_counts": task_counts}
            if "router_load" in aux:
                stats["router_load"] = aux["router_load"]
                stats["router_task_assignments"] = router_assignments_by_task(
                    aux["router_assignments"], batch["token_task_ids"], num_tasks)
            return objective, stats

        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

        def accumulate(carry, inputs):
            grads_sum, objective_sum = carry
            batch, index = inputs
            (objective, stats), grads = grad_fn(state.trainable, batch, jax.random.fold_in(step_rng, index))
            grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
            return (grads_sum, objective_sum + objective), stats

        zeros = jax.tree.map(jnp.zeros_like, state.trainable)
        (grads, objective), stats = loops.scan(accumulate, (zeros, jnp.zeros((), jnp.float32)),
                                                 (micro_batches, jnp.arange(num_micro)))
        grad_norm = _global_norm(grads)
        finite = jnp.isfinite(objective) & jnp.isfinite(grad_norm)
        updates, new_opt_state = tx.update(grads, state.opt_state, state.trainable)
        new_trainable = optax.apply_updates(state.trainable, updates)
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731 - skip non-finite updates entirely
        new_state = TrainState(
            step=state.step + 1,
            trainable=jax.tree.map(keep, new_trainable, state.trainable),
            opt_state=jax.tree.map(keep, new_opt_state, state.opt_state),
            rng=jax.random.key_data(rng),
            nonfinite_in_a_row=jnp.where(finite, 0, state.nonfinite_in_a_row + 1),
            skipped_total=state.skipped_total + (~finite).astype(jnp.int32),
        )
        metrics = {
            "loss": objective, "ce": stats["ce_sum"].sum() / total_tokens, "aux_loss": stats["aux_loss"].mean(),
            "grad_norm": grad_norm, "learning_rate": schedule(state.step), "finite": finite,
            "supervised_tokens": total_tokens, "task_ce_sum": stats["task_sums"].sum(0),
            "task_tokens": stats["task_counts"].sum(0),
        }
        if "router_load" in stats:
            metrics["router_load"] = stats["router_load"].mean(0)
            metrics["router_task_assignments"] = stats["router_task_assignments"].sum(0)
        return new_state, metrics

    def eval_step(trainable: Flat, frozen, batch: dict):
        ce, mask, tasks, _ = token_losses(merge(trainable, frozen), batch, None, loss_chunk)
        task_sums, task_counts = per_task_sums(ce, mask, tasks, num_tasks)
        return {"ce_sum": ce.sum(), "tokens": mask.sum(), "task_ce_sum": task_sums, "task_tokens": task_counts}

    return StepFunctions(train_step=train_step, eval_step=eval_step)


def jit_train_step(train_step: Callable, state_shardings: Any, frozen_shardings: Any):
    """The train step as the trainer runs it (and `omnimol compile` compiles it): explicit shardings of the state
    and the frozen weights, the batch as placed, the state donated."""
    return jax.jit(train_step, in_shardings=(state_shardings, frozen_shardings, None),
                   out_shardings=(state_shardings, None), donate_argnums=(0,))


def make_optimizer(train_config) -> tuple[optax.GradientTransformation, Callable]:
    """AdamW with linear warmup and cosine decay, after global-norm clipping (docs/omnimol.md §4)."""
    warmup = int(round(train_config.warmup_ratio * train_config.max_steps))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=train_config.learning_rate, warmup_steps=max(warmup, 0),
        decay_steps=max(train_config.max_steps, warmup + 1),
        end_value=train_config.learning_rate * train_config.min_lr_ratio)
    parts = []
    if train_config.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(train_config.grad_clip_norm))
    parts.append(optax.adamw(schedule, b1=train_config.adam_b1, b2=train_config.adam_b2, eps=train_config.adam_eps,
                             weight_decay=train_config.weight_decay))
    return optax.chain(*parts), schedule

"""The train step's objective: exact token-mean CE, the task-balanced variant, and gradient accumulation."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from omnimol_jax.config import GraphConfig, LoRAConfig, TrainConfig, model_config_from_preset
from omnimol_jax.constants import IGNORE_INDEX
from omnimol_jax.model.build import omnimol_constructor
from omnimol_jax.train.program import build_train_program
from omnimol_jax.train.recipes import trainable_filter
from omnimol_jax.train.step import make_optimizer

CONFIG = dataclasses.replace(model_config_from_preset("tiny"), lora=LoRAConfig(enabled=True, rank=4, dropout=0.0))


def text_batch(seed: int, rows: int = 4, seq: int = 12) -> dict:
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, CONFIG.vocab_size, (rows, seq)).astype(np.int32)
    labels = np.where(np.arange(seq)[None] >= seq // 2, ids, IGNORE_INDEX).astype(np.int32)  # answers only
    ones = np.ones((rows, seq), np.int32)
    tasks = np.repeat(np.arange(rows, dtype=np.int32)[:, None] % 3, seq, axis=1)  # three tasks
    return {"input_ids": ids, "labels": labels, "positions": np.tile(np.arange(seq, dtype=np.int32), (rows, 1)),
            "segment_ids": ones, "attention_mask": ones, "token_task_ids": tasks, "graphs": None}


def setup(task_balanced: bool):
    model = omnimol_constructor(CONFIG, GraphConfig(num_layers=1, hidden_size=8), seed=0)()
    tx, schedule = make_optimizer(TrainConfig(max_steps=10, learning_rate=1e-2, warmup_ratio=0.0))
    program = build_train_program(model, trainable_filter(2), tx, schedule, num_tasks=3,
                                  task_balanced=task_balanced)
    rng = np.random.default_rng(1)
    params = {k: (jnp.asarray(rng.normal(0, 0.05, v.shape), v.dtype) if k.endswith("/b") else v)
              for k, v in program.trainable.items()}
    return program.steps, program.initial_state(trainable=params), program.frozen


def stack(*batches):
    return jax.tree.map(lambda *x: np.stack(x), *batches)


def test_loss_is_the_token_mean_and_task_balanced_is_the_mean_of_normalised_task_losses():
    steps, state, frozen = setup(task_balanced=False)
    batch = text_batch(0)
    per_task = jax.jit(steps.eval_step)(state.trainable, frozen, batch)
    task_loss = np.asarray(per_task["task_ce_sum"]) / np.asarray(per_task["task_tokens"])
    _, metrics = jax.jit(steps.train_step)(state, frozen, stack(batch))
    assert float(metrics["loss"]) == pytest.approx(float(per_task["ce_sum"]) / float(per_task["tokens"]), rel=1e-6)

    balanced_steps, balanced_state, _ = setup(task_balanced=True)
    _, metrics = jax.jit(balanced_steps.train_step)(balanced_state, frozen, stack(batch))
    assert float(metrics["loss"]) == pytest.approx(float(np.mean(task_loss / (task_loss + 1e-5))), rel=1e-6)


def test_gradient_accumulation_equals_one_big_batch():
    steps, state, frozen = setup(task_balanced=False)
    a, b = text_batch(1, rows=2), text_batch(2, rows=2)
    both = jax.tree.map(lambda x, y: None if x is None else np.concatenate([x, y]), a, b,
                        is_leaf=lambda x: x is None)
    accumulated, m_acc = jax.jit(steps.train_step)(state, frozen, stack(a, b))
    steps2, state2, frozen2 = setup(task_balanced=False)  # a fresh state: the first step's was donated
    whole, m_whole = jax.jit(steps2.train_step)(state2, frozen2, stack(both))
    assert float(m_acc["loss"]) == pytest.approx(float(m_whole["loss"]), rel=1e-6)
    assert float(m_acc["grad_norm"]) == pytest.approx(float(m_whole["grad_norm"]), rel=1e-5)
    for key in whole.trainable:
        np.testing.assert_allclose(np.asarray(accumulated.trainable[key]), np.asarray(whole.trainable[key]),
                                   atol=1e-6, err_msg=key)


@pytest.mark.parametrize("tied", [True, False])
def test_the_chunked_loss_equals_the_full_logits_loss_in_value_and_every_gradient(tied):
    """train.loss_chunk: the head and CE a few positions at a time (never [B, S, vocab] logits) change nothing."""
    from omnimol_jax.train.step import token_losses

    config = dataclasses.replace(CONFIG, tie_word_embeddings=tied)
    model = omnimol_constructor(config, GraphConfig(num_layers=1, hidden_size=8), seed=0)()
    # the head (tied embedding or lm_head) and the last norm train too, so their gradients are compared
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(2, ["embed_tokens", "lm_head", "/norm/"]), ...)
    rng = np.random.default_rng(1)
    trainable = jax.tree.map(lambda v: v + jnp.asarray(rng.normal(0, 0.05, v.shape), v.dtype), trainable)
    batch = text_batch(0, seq=13)

    def loss(tr, chunk):
        ce, mask, _, _ = token_losses(nnx.merge(graphdef, tr, frozen), batch, None, chunk)
        return ce.sum() / mask.sum(), ce

    (full, ce_full), grads_full = jax.value_and_grad(loss, has_aux=True)(trainable, 0)
    for chunk in (5, 12, 64):  # uneven chunks, exactly the length, longer than the sequence
        (value, ce), grads = jax.value_and_grad(loss, has_aux=True)(trainable, chunk)
        np.testing.assert_allclose(np.asarray(ce), np.asarray(ce_full), atol=1e-5, rtol=1e-6)
        assert abs(float(value - full)) <= 1e-6
        flat, flat_full = dict(nnx.to_flat_state(grads)), dict(nnx.to_flat_state(grads_full))
        assert flat.keys() == flat_full.keys() and any("embed_tokens" in str(p) for p in flat)
        for path in flat:
            np.testing.assert_allclose(np.asarray(flat[path].get_value()), np.asarray(flat_full[path].get_value()),
                                       atol=1e-6, rtol=1e-5, err_msg=str(path))

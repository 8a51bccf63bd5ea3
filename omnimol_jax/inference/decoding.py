"""Batched generation under `jax.jit` with the KV cache: greedy, seeded temperature / top-p / top-k sampling,
beam search, stop tokens, graph splice on the prompt, optional SELFIES-constrained decoding.

Shapes are static so one compilation serves many batches:
- prompts are LEFT-padded to a length bucket (the caller's, e.g. one planned for a whole eval by
  prompt_buckets.py; else a power of two, at least `min_prompt_bucket`), so the last prompt position is real for
  every row and the first new token comes from the prefill's last logits;
- the batch is padded to a fixed row count with dummy rows (their outputs are dropped);
- the graph batch is padded to a budget set by rows x bucket (one node and two edges per token slot), and a
  batch without molecules gets an empty one, so one program serves every batch of a prompt shape;
- the cache holds bucket + max_new_tokens slots.
One program per (rows, prompt bucket, max_new_tokens, decoding mode) is compiled and reused (a batch whose bonds
overflow the budget gets a power-of-two one, and its own program).

The whole generation (prefill, then a `lax.while_loop` of one-token decode steps that stops as soon as every row
has finished) is one jitted call. Positions follow the cache's count of real tokens, so left padding does not
shift them. A row that emits a stop token is finished: it keeps emitting `pad_token_id` while the others go on.

Decoding modes (`GenerationConfig`):
- greedy (temperature 0, num_beams 1): argmax;
- sampling (temperature > 0): logits / T, then top-k and nucleus (top-p) filtering, then a categorical draw with
  a per-row key fold_in(PRNGKey(seed), row_seed), folded with the step: a row's draw depends on its seed and its
  logits only, not on the batch it is in;
- beam search (num_beams K > 1): K live beams per row; a candidate that ends with a stop token joins the row's
  K finished hypotheses when it ranks among the top K candidates of the step (as in transformers, so K = 1 is
  exactly greedy); the score of a hypothesis is its summed log-probability / length ** length_penalty (length =
  generated tokens including the stop token; length_penalty 0 ranks by the raw sum). A row stops when its worst
  finished hypothesis beats every score its live beams can still reach; at max_new_tokens, live beams compete
  with the finished ones. Returns the K best, sorted by score.
With a SELFIES constraint (see `selfies_constraint`), disallowed tokens get -inf before the step's softmax,
so probabilities, scores and samples are those of the renormalised constrained distribution.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Literal, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from omnimol_jax.constants import NUM_ATOM_FEATURES, NUM_BOND_FEATURES
from omnimol_jax.data.graphs import batch_graphs, next_power_of_two, prompt_graph_budget
from omnimol_jax.errors import InputError
from omnimol_jax.graph_batch import GraphBatch
from omnimol_jax.inference.selfies_constraint import START_STATE, ConstraintTables, SelfiesConstraint
from omnimol_jax.model.kv_cache import KVCache, gather_cache, init_kv_cache, tile_cache
from omnimol_jax.model.llama import LlamaForCausalLM
from omnimol_jax.model.omnimol import OmniMolModel
from omnimol_jax.sharding import named_sharding, state_shardings, use_mesh

NEG_INF = float("-inf")


class GenerationError(InputError):
    """Bad generation input (prompt too long, graph slots and atoms disagree, ...); names the row."""


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """How to decode. temperature 0 with num_beams 1 is greedy; temperature > 0 samples; num_beams > 1 is beam
    search (deterministic; temperature / top-p / top-k are ignored there)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    num_beams: int = 1
    length_penalty: float = 0.0  # beam search: score = sum log p / length ** length_penalty
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not math.isfinite(self.temperature):
            raise GenerationError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise GenerationError(f"top_k must be >= 0, got {self.top_k}")
        if self.num_beams < 1:
            raise GenerationError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.length_penalty < 0:
            raise GenerationError(f"length_penalty must be >= 0, got {self.length_penalty}")

    @property
    def mode(self) -> Literal["greedy", "sample", "beam"]:
        if self.num_beams > 1:
            return "beam"
        return "sample" if self.temperature > 0 else "greedy"


@dataclasses.dataclass
class GenerationOutput:
    """Host arrays, K = num_beams (1 for greedy / sampling), T = max_new_tokens.

    tokens         int32 [B, K, T]: generated ids, the stop token included, pad after it
    lengths        int32 [B, K]: generated tokens including the stop token
    finished       bool [B, K]: ended with a stop token (else cut at max_new_tokens)
    answer_lengths int32 [B, K]: tokens that form the answer: the stop token excluded; with a constraint, a
                   row cut at max_new_tokens keeps its longest complete SELFIES prefix
    logprobs       float32 [B, K]: summed log-probabilities of the generated tokens (stop token included)
                   under the distribution decoded from (constrained, temperature / top-p filtered)
    scores         float32 [B, K]: ranking score (beam: logprobs / length ** length_penalty; else logprobs)
    """

    tokens: np.ndarray
    lengths: np.ndarray
    finished: np.ndarray
    answer_lengths: np.ndarray
    logprobs: np.ndarray
    scores: np.ndarray

    def answer_ids(self, row: int, beam: int = 0) -> list[int]:
        return self.tokens[row, beam, : self.answer_lengths[row, beam]].tolist()

    def generated_ids(self, row: int, beam: int = 0) -> list[int]:
        """Every generated token, the stop token included (the reference protocol's raw answer)."""
        return self.tokens[row, beam, : self.lengths[row, beam]].tolist()


class PromptBatch(NamedTuple):
    """Device-ready prompt batch: left-padded ids and mask [R, P], the padded graph batch or None."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    graphs: Optional[GraphBatch]


def prompt_bucket(length: int, min_bucket: int = 32) -> int:
    """Padded prompt length: the next power of two, at least `min_bucket`."""
    return max(int(min_bucket), next_power_of_two(length))


def build_prompt_batch(prompts: Sequence[Sequence[int]], graphs: Optional[Sequence[Any]], *, pad_token_id: int,
                       rows: Optional[int] = None, bucket: Optional[int] = None, min_bucket: int = 32,
                       record_ids: Optional[Sequence[str]] = None,
                       graph_feature_widths: Optional[tuple[int, int]] = None) -> PromptBatch:
    """Left-pads prompts (graph slots already expanded) into [rows, bucket] and batches their graphs.

    Extra rows (up to `rows`) are dummies: one pad token, no graph. Graph slots must match the graph's atoms.
    `graph_feature_widths` (atom, bond feature columns; a model with a graph tower): a batch without molecules
    gets an empty graph batch of the same budget, so it runs the program that batches with molecules run.
    """
    from omnimol_jax.data.graph_slots import GraphSlotError, check_graph_slots

    count = len(prompts)
    rows = count if rows is None else rows
    if count == 0 or rows < count:
        raise GenerationError(f"{count} prompts for {rows} rows")
    names = [str(r) for r in (record_ids if record_ids is not None else range(count))]
    if graphs is not None and len(graphs) != count:
        raise GenerationError(f"{count} prompts but {len(graphs)} graphs")
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise GenerationError(f"record {names[lengths.index(0)]}: empty prompt")
    bucket = prompt_bucket(max(lengths), min_bucket) if bucket is None else bucket
    if max(lengths) > bucket:
        raise GenerationError(f"record {names[int(np.argmax(lengths))]}: prompt of {max(lengths)} tokens exceeds the "
                              f"bucket of {bucket}")
    input_ids = np.full((rows, bucket), pad_token_id, np.int32)
    mask = np.zeros((rows, bucket), np.int32)
    for row, prompt in enumerate(prompts):
        ids = np.asarray(prompt, np.int32)
        try:
            check_graph_slots(ids, None if graphs is None or graphs[row] is None else graphs[row].num_nodes,
                              record_id=names[row])
        except GraphSlotError as err:
            raise GenerationError(str(err)) from None
        input_ids[row, bucket - len(ids):] = ids
        mask[row, bucket - len(ids):] = 1
    mask[count:, -1] = 1  # dummy rows: one real (pad) token, so attention never sees an empty row
    graph_batch = None
    has_graphs = graphs is not None and any(g is not None for g in graphs)
    if has_graphs or graph_feature_widths is not None:
        padded_graphs = list(graphs if graphs is not None else [None] * count) + [None] * (rows - count)
        graph_batch, _ = batch_graphs(padded_graphs, prompt_graph_budget(padded_graphs, rows, bucket),
                                      record_ids=names + [f"<dummy {i}>" for i in range(rows - count)], strict=True,
                                      feature_widths=graph_feature_widths)
    return PromptBatch(input_ids, mask, graph_batch)


# --------------------------------------------------------------------------------------------------
# Device-side pieces


def forward_last(model: nnx.Module, input_ids: jax.Array, attention_mask: jax.Array, cache: KVCache,
                 graphs: Optional[GraphBatch], fresh_cache: bool = False):
    """Logits of the last position [B, V] (fp32) and the new cache; OmniMolModel or a bare LlamaForCausalLM.

    The output head is applied to the last position only (the model's full-sequence logits are unused, so XLA
    drops them): a prefill of B x P tokens never materialises B x P x vocab logits. fresh_cache: `cache` is empty
    and this is the whole prefill (attention over the prompt's keys only; LlamaForCausalLM.__call__).
    """
    if isinstance(model, OmniMolModel):
        out = model(input_ids, graphs, attention_mask=attention_mask, cache=cache, return_hidden_states=True,
                    fresh_cache=fresh_cache)
    else:
        if graphs is not None:
            raise GenerationError("graphs given, but the model has no graph tower")
        out = model(input_ids, attention_mask=attention_mask, cache=cache, return_hidden_states=True,
                    fresh_cache=fresh_cache)
    logits = language_model(model).lm_logits(out.hidden_states[:, -1:])
    return logits[:, 0].astype(jnp.float32), out.cache


def language_model(model: nnx.Module) -> LlamaForCausalLM:
    """The Llama inside an OmniMolModel, or the model itself."""
    return model.language_model if isinstance(model, OmniMolModel) else model


def language_config(model: nnx.Module):
    return language_model(model).config


def _allowed_mask(tables: ConstraintTables, states: jax.Array, vocab_size: int, stop_ids: jax.Array) -> jax.Array:
    """bool [N, V]: tokens the automaton allows in each row's state (stop tokens where the answer is complete)."""
    next_states = tables.transitions[states]  # [N, C]
    allowed = jnp.zeros((states.shape[0], vocab_size), jnp.bool_)
    allowed = allowed.at[:, tables.candidate_ids].set(next_states >= 0)
    stop_ok = tables.accepting[states] | ~jnp.any(next_states >= 0, axis=-1)  # never leave a row without options
    return allowed.at[:, stop_ids].set(stop_ok[:, None])


def _next_state(tables: ConstraintTables, states: jax.Array, tokens: jax.Array) -> jax.Array:
    candidate = tables.token_candidate[tokens]
    nxt = tables.transitions[states, jnp.maximum(candidate, 0)]
    nxt = jnp.where(candidate >= 0, nxt, states)  # stop / pad tokens: the row is finished, the state is moot
    return jnp.where(nxt >= 0, nxt, START_STATE)  # only dead (-inf) beams can take a disallowed token


def _filter_logits(logits: jax.Array, temperature: jax.Array, top_p: jax.Array, top_k: int) -> jax.Array:
    """Temperature, then top-k, then nucleus filtering; removed tokens get -inf."""
    logits = logits / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits >= kth, logits, NEG_INF)
    descending = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(descending, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < top_p  # the most likely token always stays (mass before it is 0)
    threshold = jnp.min(jnp.where(keep, descending, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= threshold, logits, NEG_INF)


def _is_stop(tokens: jax.Array, stop_ids: jax.Array) -> jax.Array:
    return jnp.any(tokens[..., None] == stop_ids, axis=-1)


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything that shapes the compiled program (hashable, a static jit argument)."""

    mode: str
    max_new_tokens: int
    num_beams: int
    top_k: int
    length_penalty: float
    constrained: bool
    pad_token_id: int


def _generate_impl(graphdef, static: _Static, state, input_ids, attention_mask, graphs, row_seeds, seed,
                   temperature, top_p, stop_ids, tables: Optional[ConstraintTables]):
    model = nnx.merge(graphdef, state)
    config = language_config(model)
    rows, prompt_len = input_ids.shape
    steps = static.max_new_tokens
    cache = init_kv_cache(config, rows, prompt_len + steps)
    logits, cache = forward_last(model, input_ids, attention_mask, cache, graphs, fresh_cache=True)
    if static.mode == "beam":
        return _beam_search(model, static, logits, cache, stop_ids, tables)
    return _sample_loop(model, static, logits, cache, row_seeds, seed, temperature, top_p, stop_ids, tables)


def _sample_loop(model, static: _Static, logits, cache, row_seeds, seed, temperature, top_p, stop_ids, tables):
    rows, vocab = logits.shape
    steps = static.max_new_tokens
    pad = static.pad_token_id
    row_keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.PRNGKey(seed), s))(row_seeds)

    def select(step, logits, done, cstate):
        if static.constrained:
            logits = jnp.where(_allowed_mask(tables, cstate, vocab, stop_ids), logits, NEG_INF)
        if static.mode == "sample":
            logits = _filter_logits(logits, temperature, top_p, static.top_k)
            keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(row_keys)
            token = jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)
        else:
            token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        logprob = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), token[:, None], axis=-1)[:, 0]
        token = jnp.where(done, pad, token)
        return token, jnp.where(done, 0.0, logprob)

    def record(carry, step, token, logprob):
        tokens, done, lengths, answer_len, total, cstate = carry
        stop = _is_stop(token, stop_ids)
        tokens = tokens.at[:, step].set(token)
        lengths = jnp.where(done, lengths, step + 1)
        total = total + logprob
        if static.constrained:
            cstate = jnp.where(done | stop, cstate, _next_state(tables, cstate, token))
            complete = tables.accepting[cstate] & ~done & ~stop
            answer_len = jnp.where(complete, step + 1, answer_len)
        else:
            answer_len = jnp.where(done | stop, answer_len, step + 1)
        return tokens, done | stop, lengths, answer_len, total, cstate

    carry = (jnp.full((rows, steps), pad, jnp.int32), jnp.zeros((rows,), jnp.bool_), jnp.zeros((rows,), jnp.int32),
             jnp.zeros((rows,), jnp.int32), jnp.zeros((rows,), jnp.float32),
             jnp.full((rows,), START_STATE, jnp.int32))
    token, logprob = select(0, logits, carry[1], carry[5])
    carry = record(carry, 0, token, logprob)

    def cond(loop):
        step, _, _, carry = loop
        return (step < steps) & ~jnp.all(carry[1])

    def body(loop):
        step, last, cache, carry = loop
        logits, cache = forward_last(model, last[:, None], jnp.ones((rows, 1), jnp.int32), cache, None)
        token, logprob = select(step, logits, carry[1], carry[5])
        return step + 1, token, cache, record(carry, step, token, logprob)

    _, _, _, carry = jax.lax.while_loop(cond, body, (jnp.int32(1), token, cache, carry))
    tokens, done, lengths, answer_len, total, _ = carry
    return {"tokens": tokens[:, None], "lengths": lengths[:, None], "finished": done[:, None],
            "answer_lengths": answer_len[:, None], "logprobs": total[:, None], "scores": total[:, None]}


def _beam_search(model, static: _Static, logits, cache, stop_ids, tables):
    rows, vocab = logits.shape
    beams, steps, pad = static.num_beams, static.max_new_tokens, static.pad_token_id
    flat = rows * beams
    if 2 * beams > vocab:
        raise GenerationError(f"num_beams {beams} needs a vocabulary of at least {2 * beams} tokens")
    cache = tile_cache(cache, beams)
    logits = jnp.repeat(logits, beams, axis=0)

    def norm(score, length):
        if static.length_penalty == 0.0:
            return score
        return score / jnp.maximum(length, 1).astype(jnp.float32) ** static.length_penalty

    # Best score live beams may still reach: their sums only decrease, and length only helps up to `steps`.
    def reachable(alive_scores):
        return norm(alive_scores, jnp.full_like(alive_scores, steps, jnp.int32))

    def step_fn(step, logits, carry):
        (alive_seqs, alive_scores, alive_state, alive_answer, fin_seqs, fin_scores, fin_logprobs, fin_lengths,
         fin_answer, done) = carry
        if static.constrained:
            logits = jnp.where(_allowed_mask(tables, alive_state.reshape(-1), vocab, stop_ids), logits, NEG_INF)
        logprobs = jax.nn.log_softmax(logits, axis=-1).reshape(rows, beams, vocab)
        candidates = (alive_scores[:, :, None] + logprobs).reshape(rows, beams * vocab)
        cand_scores, cand_index = jax.lax.top_k(candidates, 2 * beams)  # sorted, best first
        parent, token = cand_index // vocab, (cand_index % vocab).astype(jnp.int32)
        cand_seqs = jnp.take_along_axis(alive_seqs, parent[:, :, None], axis=1).at[:, :, step].set(token)
        stop = _is_stop(token, stop_ids)
        # -- finished hypotheses: stop-token candidates ranked among the top `beams` of this step
        rank = jnp.arange(2 * beams)[None, :]
        joins = stop & (rank < beams) & ~done[:, None] & (cand_scores > NEG_INF)
        new_fin_scores = jnp.where(joins, norm(cand_scores, jnp.full_like(cand_index, step + 1)), NEG_INF)
        pooled_scores = jnp.concatenate([fin_scores, new_fin_scores], axis=1)
        best_scores, best = jax.lax.top_k(pooled_scores, beams)
        def pick(old, new):
            both = jnp.concatenate([old, new], axis=1)
            return jnp.take_along_axis(both, best if both.ndim == 2 else best[:, :, None], axis=1)

        fin_seqs = pick(fin_seqs, cand_seqs)
        fin_logprobs = pick(fin_logprobs, cand_scores)
        fin_lengths = pick(fin_lengths, jnp.full_like(cand_index, step + 1, dtype=jnp.int32))
        fin_answer = pick(fin_answer, jnp.full_like(cand_index, step, dtype=jnp.int32))
        fin_scores = best_scores
        # -- live beams: the best `beams` candidates that did not stop
        alive_cand = jnp.where(stop, NEG_INF, cand_scores)
        alive_scores, keep = jax.lax.top_k(alive_cand, beams)
        parent = jnp.take_along_axis(parent, keep, axis=1)
        token = jnp.take_along_axis(token, keep, axis=1)
        alive_seqs = jnp.take_along_axis(cand_seqs, keep[:, :, None], axis=1)
        flat_parent = (jnp.arange(rows)[:, None] * beams + parent).reshape(-1)
        state = jnp.take_along_axis(alive_state, parent, axis=1)
        answer = jnp.take_along_axis(alive_answer, parent, axis=1)
        if static.constrained:
            state = _next_state(tables, state.reshape(-1), token.reshape(-1)).reshape(rows, beams)
            answer = jnp.where(tables.accepting[state], step + 1, answer)
        else:
            answer = jnp.full_like(answer, step + 1)
        worst_finished = fin_scores[:, -1]
        done = done | (worst_finished >= reachable(alive_scores[:, 0])) | (alive_scores[:, 0] == NEG_INF)
        carry = (alive_seqs, alive_scores, state, answer, fin_seqs, fin_scores, fin_logprobs, fin_lengths,
                 fin_answer, done)
        return carry, token.reshape(-1), flat_parent

    first = jnp.where(jnp.arange(beams) == 0, 0.0, NEG_INF)  # identical beams at the start: expand only one
    carry = (jnp.full((rows, beams, steps), pad, jnp.int32), jnp.broadcast_to(first, (rows, beams)),
             jnp.full((rows, beams), START_STATE, jnp.int32), jnp.zeros((rows, beams), jnp.int32),
             jnp.full((rows, beams, steps), pad, jnp.int32), jnp.full((rows, beams), NEG_INF, jnp.float32),
             jnp.full((rows, beams), NEG_INF, jnp.float32), jnp.zeros((rows, beams), jnp.int32),
             jnp.zeros((rows, beams), jnp.int32), jnp.zeros((rows,), jnp.bool_))
    carry, token, flat_parent = step_fn(0, logits, carry)

    def cond(loop):
        step, _, _, _, carry = loop
        return (step < steps) & ~jnp.all(carry[-1])

    def body(loop):
        step, token, flat_parent, cache, carry = loop
        cache = gather_cache(cache, flat_parent)
        logits, cache = forward_last(model, token[:, None], jnp.ones((flat, 1), jnp.int32), cache, None)
        carry, token, flat_parent = step_fn(step, logits, carry)
        return step + 1, token, flat_parent, cache, carry

    step, _, _, _, carry = jax.lax.while_loop(cond, body, (jnp.int32(1), token, flat_parent, cache, carry))
    (alive_seqs, alive_scores, _, alive_answer, fin_seqs, fin_scores, fin_logprobs, fin_lengths, fin_answer,
     _) = carry
    # Live beams cut at the last step compete with the finished hypotheses.
    alive_lengths = jnp.full_like(alive_answer, step)
    pooled = jnp.concatenate([fin_scores, norm(alive_scores, alive_lengths)], axis=1)
    scores, best = jax.lax.top_k(pooled, beams)

    def pick(a, b):
        both = jnp.concatenate([a, b], axis=1)
        return jnp.take_along_axis(both, best if both.ndim == 2 else best[:, :, None], axis=1)

    finished = pick(jnp.ones_like(fin_lengths, jnp.bool_), jnp.zeros_like(alive_lengths, jnp.bool_))
    return {"tokens": pick(fin_seqs, alive_seqs), "lengths": pick(fin_lengths, alive_lengths), "finished": finished,
            "answer_lengths": pick(fin_answer, alive_answer), "logprobs": pick(fin_logprobs, alive_scores),
            "scores": scores}


_generate_jit = jax.jit(_generate_impl, static_argnums=(0, 1))


# --------------------------------------------------------------------------------------------------
# Host-side driver


class Generator:
    """Jitted batched generation for one model (OmniMolModel or LlamaForCausalLM).

    model          the module; its state is split once and passed to the compiled programs
    pad_token_id   id used for left padding and for finished rows
    stop_token_ids ids that end an answer (e.g. `<|eot_id|>` and `<|end_of_text|>`)
    mesh           optional: programs are jitted with explicit shardings (parameters by their logical axes,
                   prompts split over the batch axes, outputs replicated); the model's arrays should already
                   be laid out on it (e.g. `load_omnimol(..., mesh=mesh)`)
    constraint     optional SELFIES automaton, used by `generate(..., constrained=True)`
    """

    def __init__(self, model: nnx.Module, *, pad_token_id: int, stop_token_ids: Sequence[int],
                 mesh: Optional[jax.sharding.Mesh] = None, constraint: Optional[SelfiesConstraint] = None,
                 min_prompt_bucket: int = 32):
        if not stop_token_ids:
            raise GenerationError("at least one stop token id is needed")
        self.graphdef, self.state = nnx.split(model)
        self.config = language_config(model)
        self.pad_token_id = int(pad_token_id)
        self.stop_token_ids = tuple(int(i) for i in stop_token_ids)
        bad = [i for i in self.stop_token_ids + (self.pad_token_id,) if not 0 <= i < self.config.vocab_size]
        if bad:
            raise GenerationError(f"token ids {bad} are outside the model vocabulary of {self.config.vocab_size}")
        self.mesh = mesh
        self.min_prompt_bucket = int(min_prompt_bucket)
        # With a graph tower, text-only batches carry an empty graph batch: they share the molecule batches' program.
        self.graph_feature_widths = None
        if isinstance(model, OmniMolModel):
            mode = model.graph_tower.config.feature_mode
            self.graph_feature_widths = (NUM_ATOM_FEATURES[mode], NUM_BOND_FEATURES[mode])
        self.constraint = constraint
        if constraint is not None and constraint.vocab_size != self.config.vocab_size:
            raise GenerationError(f"the constraint covers {constraint.vocab_size} token ids, the model has "
                                  f"{self.config.vocab_size}")
        self._tables = constraint.device_tables() if constraint is not None else None
        self._programs: dict[_Static, Any] = {}

    def _program(self, static: _Static, example_args: tuple):
        if self.mesh is None:  # shared by every Generator of the same model structure
            return functools.partial(_generate_jit, self.graphdef, static)
        program = self._programs.get(static)
        if program is None:
            mesh = self.mesh
            replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            ids = example_args[1]
            rows_sharding = named_sharding(mesh, ("activation_batch", None), ids.shape)
            seeds_sharding = named_sharding(mesh, ("activation_batch",), ids.shape[:1])
            in_shardings = (state_shardings(self.state, mesh), rows_sharding, rows_sharding,
                            jax.tree.map(lambda _: replicated, example_args[3]), seeds_sharding, replicated,
                            replicated, replicated, replicated, jax.tree.map(lambda _: replicated, example_args[9]))
            program = jax.jit(functools.partial(_generate_impl, self.graphdef, static), in_shardings=in_shardings,
                              out_shardings=replicated)
            self._programs[static] = program
        return program

    def program_for(self, batch: PromptBatch, config: GenerationConfig, *, seeds: Optional[np.ndarray] = None,
                    constrained: bool = False) -> tuple[Any, tuple]:
        """(the jitted program for this batch shape and config, its arguments); `omnimol compile` lowers it."""
        if seeds is None:
            seeds = np.arange(batch.input_ids.shape[0], dtype=np.int32)
        static = _Static(config.mode, config.max_new_tokens, config.num_beams, config.top_k,
                         float(config.length_penalty), bool(constrained), self.pad_token_id)
        args = (self.state, batch.input_ids, batch.attention_mask, batch.graphs, seeds,
                np.int32(config.seed % (2 ** 31)), np.float32(max(config.temperature, 1e-6)),
                np.float32(config.top_p), np.asarray(self.stop_token_ids, np.int32),
                self._tables if constrained else None)
        return self._program(static, args), args

    def generate(self, prompts: Sequence[Sequence[int]], config: GenerationConfig = GenerationConfig(),
                 graphs: Optional[Sequence[Any]] = None, *, row_seeds: Optional[Sequence[int]] = None,
                 constrained: bool = False, rows: Optional[int] = None,
                 record_ids: Optional[Sequence[str]] = None, bucket: Optional[int] = None) -> GenerationOutput:
        """Generates for `prompts` (token ids with graph slots expanded; `graphs[i]` the MolGraph of prompt i or
        None). `rows` pads the batch to a fixed row count and `bucket` the prompts to a fixed length (default:
        the next power of two), so that one compile serves every batch of a run (see prompt_buckets.py);
        `row_seeds` (default: the row index) makes each row's sampling independent of its batch."""
        if constrained and self.constraint is None:
            raise ValueError("constrained decoding needs a Generator built with a SelfiesConstraint")
        count = len(prompts)
        longest = max((len(p) for p in prompts), default=0)
        overflow = self.config.position_overflow(longest, config.max_new_tokens)
        if overflow:
            raise GenerationError(overflow)
        batch = build_prompt_batch(prompts, graphs, pad_token_id=self.pad_token_id, rows=rows, bucket=bucket,
                                   min_bucket=self.min_prompt_bucket, record_ids=record_ids,
                                   graph_feature_widths=self.graph_feature_widths)
        seeds = np.arange(batch.input_ids.shape[0], dtype=np.int32)
        if row_seeds is not None:
            if len(row_seeds) != count:
                raise ValueError(f"{count} prompts but {len(row_seeds)} row seeds")
            seeds[:count] = np.asarray(row_seeds, np.int64) % (2 ** 31)
        program, args = self.program_for(batch, config, seeds=seeds, constrained=constrained)
        with use_mesh(self.mesh):
            out = program(*args)
        out = jax.device_get(out)
        return GenerationOutput(**{k: np.asarray(v)[:count] for k, v in out.items()})


def decode_answers(output: GenerationOutput, decode) -> list[list[str]]:
    """Answer texts [B][K] from `decode(ids) -> str` (e.g. ChatTokenizer.decode with special tokens skipped)."""
    rows, beams = output.answer_lengths.shape
    return [[decode(output.answer_ids(r, k)) for k in range(beams)] for r in range(rows)]

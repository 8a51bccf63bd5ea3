"""Median decoding of numbers (`omnimol eval --number-median K`, `omnimol generate --number-median K`).

Under absolute error the best point answer is the median of the model's distribution over the number, and
greedy digit decoding finds something else: each digit is the mode given the digits before it. On the demo
model greedy answers "300.34" for most molecular weights from 300 to 400 (its leading digit mostly follows
the truth, but the second digit's mode is "0"), and "10.40" for most TPSAs from 0 to 120, because a
leading "1" holds 1.x, 10-19 and 100-199 at once. Sampling and answering the median sample (MBR) gets the
right target but, at the demo's size, a noisy estimate of it.

This decoder walks the model's number distribution instead, deterministically:
- text outside numbers is greedy (without numbers the output is exactly greedy's);
- where greedy would start a number (a start token after whitespace or punctuation), the integer part is
  enumerated: the K most probable prefixes per step, each one's probability of ending there (the next token
  is not a digit) recorded, prefixes below `prune` of the number's mass dropped, at most
  `max_integer_tokens` tokens. The answer's integer part is the weighted median of the recorded ones,
  ordered by value with the sign (-1.x < -0.x < 0.x < 1.x);
- the KV cache is rewound to where the number began and the chosen integer part is fed;
- a decimal point is chosen greedily against the other non-digit tokens; then each fraction token is the
  median of its position's distribution over {end, digit tokens} in value order (a sequential median: exact
  for one position, an approximation for the whole fraction; the integer part carries most of the error).
Probabilities are renormalised over the tokens that can start a number, so "which number" is separated
from "is there a number here", which greedy decides.

Cost: K cache rows per prompt for the whole answer (the rows follow row 0 outside numbers) and about
2 x (integer tokens) + 1 extra steps per number. Tokens are classified by their decoded text, so the same
code serves one-digit tokenizers (the built-in one) and Llama-3's up-to-three-digit chunks.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from omnimol_jax.inference.decoding import (
    GenerationError,
    Generator,
    build_prompt_batch,
    forward_last,
    language_config,
)
from omnimol_jax.model.kv_cache import gather_cache, init_kv_cache, kv_cache_bytes, tile_cache
from omnimol_jax.sharding import use_mesh

_DIGITS = re.compile(r"\d+")
_START = re.compile(r"\s*(?:-\d*|\d+)")  # optional whitespace, then a minus and/or digits
_BOUNDARY = set("([{=:;,/")  # text after which a number may start (besides whitespace and the answer's start)


@dataclasses.dataclass(frozen=True)
class NumberTokens:
    """Which token ids can start, continue or punctuate a number, from every id's decoded text.

    digit_ids  text is digits only ("7", "046"): continue an integer part or a fraction
    start_ids  optional whitespace, then "-" and/or digits (" -", "-3", "12", " 4"): begin a number
    point_ids  text is "."
    The device table is the union; `digit_cols` / `start_cols` / `point_cols` index into it.
    """

    texts: tuple
    table_ids: np.ndarray
    digit_cols: np.ndarray
    start_cols: np.ndarray
    point_cols: np.ndarray

    @classmethod
    def from_texts(cls, texts: Sequence[Optional[str]]) -> "NumberTokens":
        digits = [i for i, t in enumerate(texts) if t and _DIGITS.fullmatch(t)]
        starts = [i for i, t in enumerate(texts) if t and _START.fullmatch(t)]
        points = [i for i, t in enumerate(texts) if t == "."]
        if not digits:
            raise ValueError("the vocabulary has no digit tokens: numbers cannot be decoded digit by digit")
        table = np.asarray(sorted(set(digits) | set(starts) | set(points)), np.int32)
        col = {int(t): c for c, t in enumerate(table)}
        return cls(tuple(texts), table, np.asarray([col[i] for i in digits], np.int32),
                   np.asarray([col[i] for i in starts], np.int32), np.asarray([col[i] for i in points], np.int32))

    @property
    def digit_mask(self) -> np.ndarray:
        mask = np.zeros(len(self.texts), np.bool_)
        mask[self.table_ids[self.digit_cols]] = True
        return mask

    def is_start(self, token_id: int) -> bool:
        text = self.texts[token_id] if 0 <= token_id < len(self.texts) else None
        return bool(text and _START.fullmatch(text))


def integer_key(text: str) -> float:
    """Value order of integer parts with their sign: "-1" < "-0" < "0" < "1" ("-0" is the interval (-1, 0])."""
    text = text.strip()
    negative = text.startswith("-")
    digits = text.lstrip("-").strip()
    if not digits.isdigit():
        raise ValueError(f"not an integer part: {text!r}")
    value = int(digits) + 0.5
    return -value if negative else value


def weighted_median(keys: Sequence[float], weights: Sequence[float]) -> int:
    """Index of the weighted median: the first item, in key order, where the cumulative weight reaches half the
    total (ties in key keep the input order)."""
    if not keys or len(keys) != len(weights):
        raise ValueError(f"{len(keys)} keys for {len(weights)} weights")
    order = sorted(range(len(keys)), key=lambda i: keys[i])
    total = float(sum(weights))
    if not total > 0:
        raise ValueError("weights sum to zero")
    running = 0.0
    for i in order:
        running += weights[i]
        if running >= 0.5 * total * (1 - 1e-12):
            return i
    return order[-1]


def _log1mexp(x: float) -> float:
    """log(1 - exp(x)) for x <= 0, floored so a certain continuation gives a tiny, not -inf, end mass."""
    return math.log(max(-math.expm1(min(x, 0.0)), 1e-30))


@dataclasses.dataclass
class MedianAnswer:
    """One prompt's answer. `numbers` has, per number decoded: the chosen integer part (a "?" per digit token
    chosen after a pruned prefix), the mass of the integer parts found (of the number's total, renormalised
    over start tokens) and the most probable ones found [[integer part, probability], ...]."""

    ids: list
    finished: bool
    numbers: list
    stop_id: Optional[int] = None  # the stop token that ended the answer (not in `ids`)


@dataclasses.dataclass
class _Hypothesis:
    logmass: float
    ids: list
    slot: int

    def text(self, texts) -> str:
        return "".join(texts[i] for i in self.ids)


@dataclasses.dataclass
class _NumberSearch:
    """The integer-part enumeration of one number.

    number_at   cache slot of the number's first token (where the answer is rewound to)
    hypotheses  prefixes fed this step (one per cache row)
    pending     prefixes not kept this step: (logmass, ids)
    outcomes    ways the integer part ends: (value key, probability, ids, extra tokens beyond ids)
    pruned      pending prefixes once their siblings were seen: (logmass, ids, end rate, index into end_rates
                of the next length)
    end_rates   per step, the share of the expanded prefixes' mass that ended there
    """

    number_at: int
    hypotheses: list = dataclasses.field(default_factory=list)
    pending: list = dataclasses.field(default_factory=list)
    outcomes: list = dataclasses.field(default_factory=list)
    pruned: list = dataclasses.field(default_factory=list)
    end_rates: list = dataclasses.field(default_factory=list)


class _Row:
    """Host state of one prompt: mode text | integer | replay | forced_digits | after_integer | fraction | done."""

    def __init__(self, live: bool):
        self.mode = "text" if live else "done"
        self.ids: list[int] = []
        self.finished = False
        self.stop_id: Optional[int] = None
        self.last_char: Optional[str] = None
        self.number: Optional[_NumberSearch] = None
        self.replay: list[int] = []
        self.forced_digits = 0  # digit tokens still owed after the replay (the median fell in a pruned block)
        self.fraction_tokens = 0
        self.numbers: list[dict] = []


def _summarise(logits: jax.Array, table_ids: jax.Array, digit_mask: jax.Array):
    """Only what the host needs: log-probabilities of the number tokens, the argmax, the argmax among
    non-digit tokens."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return (jnp.take(logp, table_ids, axis=1), jnp.argmax(logits, axis=-1).astype(jnp.int32),
            jnp.argmax(jnp.where(digit_mask[None, :], -jnp.inf, logits), axis=-1).astype(jnp.int32))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _prefill(graphdef, slots: int, cache_length: int, state, input_ids, attention_mask, graphs, table_ids,
             digit_mask):
    model = nnx.merge(graphdef, state)
    cache = init_kv_cache(language_config(model), input_ids.shape[0], cache_length)
    logits, cache = forward_last(model, input_ids, attention_mask, cache, graphs, fresh_cache=True)
    return _summarise(logits, table_ids, digit_mask), tile_cache(cache, slots)


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def _step(graphdef, state, cache, parents, tokens, feed, keep_before, table_ids, digit_mask):
    """Each row continues from row `parents[r]`'s cache with its slots >= keep_before[r] forgotten (rewinding a
    number), then reads `tokens[r]` (a no-op where feed[r] is 0)."""
    model = nnx.merge(graphdef, state)
    # Only enumeration steps move rows; the others skip the gather (a full copy of the cache per step was
    # most of the decoding time).
    identity = jnp.arange(parents.shape[0], dtype=parents.dtype)
    cache = jax.lax.cond(jnp.any(parents != identity), lambda c: gather_cache(c, parents), lambda c: c, cache)
    valid = cache.valid & (jnp.arange(cache.valid.shape[1])[None, :] < keep_before[:, None])
    cache = cache._replace(valid=valid, num_valid=valid.sum(axis=1, dtype=jnp.int32))
    logits, cache = forward_last(model, tokens[:, None], feed[:, None], cache, None)
    return _summarise(logits, table_ids, digit_mask), cache


class NumberMedianDecoder:
    """Median decoding (module docstring) with a Generator's model, pad / stop tokens and mesh.

    slots               K: integer-part prefixes kept per step (cache rows per prompt)
    prune               drop prefixes below this share of the number's probability mass
    max_integer_tokens  longest integer part, in tokens
    max_fraction_tokens longest fraction, in tokens
    """

    def __init__(self, generator: Generator, number_tokens: NumberTokens, *, slots: int = 16, prune: float = 1e-3,
                 max_integer_tokens: int = 8, max_fraction_tokens: int = 8):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        if not 0.0 <= prune < 1.0:
            raise ValueError(f"prune must be in [0, 1), got {prune}")
        if len(number_tokens.texts) != generator.config.vocab_size:
            raise ValueError(f"token texts cover {len(number_tokens.texts)} ids, the model has "
                             f"{generator.config.vocab_size}")
        self.generator = generator
        self.tokens = number_tokens
        self.slots = int(slots)
        self.log_prune = math.log(prune) if prune > 0 else -math.inf
        self.max_integer_tokens = int(max_integer_tokens)
        self.max_fraction_tokens = int(max_fraction_tokens)
        self._table_ids = jnp.asarray(number_tokens.table_ids)
        self._digit_mask = jnp.asarray(number_tokens.digit_mask)
        self._digit_ids = number_tokens.table_ids[number_tokens.digit_cols]
        self._start_ids = number_tokens.table_ids[number_tokens.start_cols]
        self._point_ids = set(number_tokens.table_ids[number_tokens.point_cols].tolist())
        self._fraction_order = self._order_fraction_tokens()
        # A pruned prefix one token longer is worth about this many times more (10 for one-digit tokens).
        self._token_scale = 10 ** max(len(number_tokens.texts[i]) for i in self._digit_ids)

    def cache_length(self, bucket: int, max_new_tokens: int) -> int:
        """Cache slots per row: the prompt, the answer, and the slots that enumeration steps and replays write and
        the answer does not keep (room for four numbers)."""
        return bucket + max_new_tokens + 4 * (2 * self.max_integer_tokens + 1)

    def max_prompts(self, bucket: int, max_new_tokens: int, budget_bytes: int) -> int:
        """How many prompts one call may take for its K cache rows each to fit `budget_bytes` (at least 1): with a
        30-layer model, 24 prompts x 16 rows x ~1100 slots is a 19 GB cache."""
        per_prompt = kv_cache_bytes(self.generator.config, self.slots, self.cache_length(bucket, max_new_tokens))
        return max(1, budget_bytes // per_prompt)

    def _order_fraction_tokens(self) -> np.ndarray:
        """Digit columns sorted by the value they add as a fraction ("05" = 0.05 < "5" = 0.5 = "50")."""
        texts = [self.tokens.texts[i] for i in self._digit_ids]
        return np.asarray(sorted(range(len(texts)), key=lambda c: (int(texts[c]) / 10 ** len(texts[c]),
                                                                   len(texts[c]))), np.int64)

    def generate(self, prompts: Sequence[Sequence[int]], graphs: Optional[Sequence[Any]] = None, *,
                 max_new_tokens: int = 128, rows: Optional[int] = None,
                 record_ids: Optional[Sequence[str]] = None, bucket: Optional[int] = None) -> list[MedianAnswer]:
        """Answers `prompts` as Generator.generate does (`rows`, `bucket`: the padded batch shape)."""
        gen = self.generator
        count = len(prompts)
        longest = max((len(p) for p in prompts), default=0)
        overflow = gen.config.position_overflow(longest, max_new_tokens)
        if overflow:
            raise GenerationError(overflow)
        batch = build_prompt_batch(prompts, graphs, pad_token_id=gen.pad_token_id, rows=rows, bucket=bucket,
                                   min_bucket=gen.min_prompt_bucket, record_ids=record_ids,
                                   graph_feature_widths=gen.graph_feature_widths)
        prompt_rows, bucket = batch.input_ids.shape
        cache_length = self.cache_length(bucket, max_new_tokens)
        with use_mesh(gen.mesh):
            summary, cache = _prefill(gen.graphdef, self.slots, cache_length, gen.state, batch.input_ids,
                                      batch.attention_mask, batch.graphs, self._table_ids, self._digit_mask)
        logp, best, best_non_digit = (np.repeat(a, self.slots, axis=0) for a in self._to_host(summary))
        states = [_Row(live=b < count) for b in range(prompt_rows)]
        index = bucket  # the cache slot the next fed token is written to (shared by all rows)
        total = prompt_rows * self.slots
        while index < cache_length and any(s.mode != "done" for s in states):
            parents = np.arange(total, dtype=np.int32)
            tokens = np.full(total, gen.pad_token_id, np.int32)
            feed = np.zeros(total, np.int32)
            keep_before = np.full(total, cache_length, np.int32)
            act = _Actions(parents, tokens, feed, keep_before, self.slots)
            for b, state in enumerate(states):
                if state.mode != "done":
                    self._advance(state, b, logp, best, best_non_digit, act, index, max_new_tokens)
            if all(s.mode == "done" for s in states):
                break
            with use_mesh(gen.mesh):
                summary, cache = _step(gen.graphdef, gen.state, cache, parents, tokens, feed, keep_before,
                                       self._table_ids, self._digit_mask)
            logp, best, best_non_digit = self._to_host(summary)
            index += 1
        return [MedianAnswer(ids=s.ids, finished=s.finished, numbers=s.numbers, stop_id=s.stop_id)
                for s in states[:count]]

    @staticmethod
    def _to_host(summary) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Host arrays; log-probabilities in float64, so sums of many small masses keep their precision."""
        logp, best, best_non_digit = jax.device_get(summary)
        return np.asarray(logp, np.float64), np.asarray(best), np.asarray(best_non_digit)

    # ------------------------------------------------------------------ per-prompt policy

    def _advance(self, state: _Row, b: int, logp, best, best_non_digit, act: "_Actions", index: int,
                 max_new_tokens: int) -> None:
        row0 = b * self.slots
        if state.mode == "text":
            token = int(best[row0])
            boundary = state.last_char is None or state.last_char.isspace() or state.last_char in _BOUNDARY
            if boundary and self.tokens.is_start(token):
                self._begin_number(state, b, logp[row0], act, index)
            else:
                self._emit(state, b, token, act, max_new_tokens)
        elif state.mode == "integer":
            self._grow_integer(state, b, logp, act, max_new_tokens)
        elif state.mode == "replay":
            self._feed_replay(state, b, act, None, max_new_tokens)
        elif state.mode == "forced_digits":
            state.forced_digits -= 1
            self._emit(state, b, self._median_digit(logp[row0], end_logmass=None), act, max_new_tokens,
                       next_mode="forced_digits" if state.forced_digits else "after_integer")
        elif state.mode == "after_integer":
            token = int(best_non_digit[row0])
            self._emit(state, b, token, act, max_new_tokens,
                       next_mode="fraction" if token in self._point_ids else "text")
            state.fraction_tokens = 0
        elif state.mode == "fraction":
            self._grow_fraction(state, b, logp[row0], int(best_non_digit[row0]), act, max_new_tokens)

    def _emit(self, state: _Row, b: int, token: int, act: "_Actions", max_new_tokens: int,
              next_mode: str = "text") -> None:
        if token in self.generator.stop_token_ids:
            state.mode, state.finished, state.stop_id = "done", True, token
            return
        state.ids.append(token)
        text = self.tokens.texts[token] if token < len(self.tokens.texts) else None
        if text:
            state.last_char = text[-1]
        state.mode = next_mode
        if len(state.ids) >= max_new_tokens:
            state.mode = "done"
            return
        act.follow_slot0(b, token)

    def _begin_number(self, state: _Row, b: int, logp_row, act: "_Actions", index: int) -> None:
        start = logp_row[self.tokens.start_cols]
        norm = start - np.logaddexp.reduce(start)
        state.number = _NumberSearch(number_at=index)
        state.mode = "integer"
        candidates = [(float(norm[c]), [int(self._start_ids[c])], 0) for c in range(len(norm))]
        self._select(state, b, candidates, act)

    def _select(self, state: _Row, b: int, candidates: list, act: "_Actions") -> bool:
        """Keeps the K most probable prefixes above the prune mass as the next step's rows; the others wait as
        pruned prefixes (`_NumberSearch`). False when none is kept."""
        candidates.sort(key=lambda c: -c[0])
        kept = [c for c in candidates[: self.slots] if c[0] >= self.log_prune]
        search = state.number
        search.pending = [(lm, ids) for lm, ids, _ in candidates[len(kept):]]
        search.hypotheses = []
        for slot, (logmass, ids, parent_slot) in enumerate(kept):
            search.hypotheses.append(_Hypothesis(logmass, ids, slot))
            act.set(b, slot, parent_slot=parent_slot, token=ids[-1])
        return bool(kept)

    def _grow_integer(self, state: _Row, b: int, logp, act: "_Actions", max_new_tokens: int) -> None:
        texts, search = self.tokens.texts, state.number
        candidates = []
        ended: dict[tuple, list[float]] = {}  # parent prefix -> [mass that ended, mass]
        for h in search.hypotheses:
            digits = logp[b * self.slots + h.slot, self.tokens.digit_cols]
            text = h.text(texts)
            if any(ch.isdigit() for ch in text):
                end = h.logmass + _log1mexp(np.logaddexp.reduce(digits))
                search.outcomes.append((integer_key(text), math.exp(end), h.ids, 0))
                group = ended.setdefault(tuple(h.ids[:-1]), [0.0, 0.0])
                group[0] += math.exp(end)
                group[1] += math.exp(h.logmass)
            if len(h.ids) < self.max_integer_tokens:
                candidates.extend((h.logmass + float(digits[c]), h.ids + [int(self._digit_ids[c])], h.slot)
                                  for c in range(len(digits)))
        level_end = sum(g[0] for g in ended.values()) / max(sum(g[1] for g in ended.values()), 1e-300)
        search.end_rates.append(level_end if ended else 1.0)
        # Prefixes pruned last step end here as often as their expanded siblings did (or the step's average).
        for logmass, ids in search.pending:
            group = ended.get(tuple(ids[:-1]))
            rate = group[0] / group[1] if group and group[1] > 0 else search.end_rates[-1]
            search.pruned.append((logmass, ids, rate, len(search.end_rates)))
        if self._select(state, b, candidates, act):
            return
        for logmass, ids in search.pending:  # never expanded: assumed to end here
            search.pruned.append((logmass, ids, 1.0, len(search.end_rates)))
        self._choose_integer(state)
        self._feed_replay(state, b, act, search.number_at, max_new_tokens)

    def _choose_integer(self, state: _Row) -> None:
        """The weighted median over every way the number's integer part can end: the ends found, and for each
        pruned prefix, its mass spread over lengths by the end rates seen for its siblings and later steps
        (its value taken as the middle of its block: prefix 12 one token longer counts as 125)."""
        texts, search = self.tokens.texts, state.number
        outcomes = list(search.outcomes)
        for logmass, ids, rate, level in search.pruned:
            text = "".join(texts[i] for i in ids)
            if not any(ch.isdigit() for ch in text):
                continue
            base, mass = integer_key(text), math.exp(logmass)
            rates = [rate] + search.end_rates[level:]
            for extra, end_rate in enumerate(rates):
                share = mass * end_rate if extra < len(rates) - 1 else mass  # the last length takes the rest
                outcomes.append((base * self._token_scale ** extra, share, ids, extra))
                mass -= share
                if mass <= 0:
                    break
        # Never empty: every digit token can start a number, and each start token ends up found or pruned.
        weights = [o[1] for o in outcomes]
        key, _, ids, extra = outcomes[weighted_median([o[0] for o in outcomes], weights)]
        state.replay, state.forced_digits = list(ids), extra
        found = sorted(search.outcomes, key=lambda o: -o[1])
        state.numbers.append({
            "integer": "".join(texts[i] for i in ids).strip() + "?" * extra,
            "found_mass": round(sum(o[1] for o in search.outcomes), 6),
            "candidates": [["".join(texts[i] for i in o[2]).strip(), round(o[1], 6)] for o in found[:5]]})
        state.number = None

    def _feed_replay(self, state: _Row, b: int, act: "_Actions", rewind_to: Optional[int],
                     max_new_tokens: int) -> None:
        if not state.replay:  # a live row that feeds nothing would read garbage logits next step
            raise AssertionError("number replay without tokens")
        token = state.replay.pop(0)
        state.ids.append(token)
        state.last_char = self.tokens.texts[token][-1]
        state.mode = "replay" if state.replay else "forced_digits" if state.forced_digits else "after_integer"
        if len(state.ids) >= max_new_tokens:
            state.mode = "done"
            return
        act.follow_slot0(b, token, keep_before=rewind_to)

    def _grow_fraction(self, state: _Row, b: int, logp_row, best_non_digit: int, act: "_Actions",
                       max_new_tokens: int) -> None:
        end = _log1mexp(np.logaddexp.reduce(logp_row[self.tokens.digit_cols]))
        token = self._median_digit(logp_row, end_logmass=end)
        if token is None or state.fraction_tokens >= self.max_fraction_tokens:
            self._emit(state, b, best_non_digit, act, max_new_tokens)
            return
        state.fraction_tokens += 1
        self._emit(state, b, token, act, max_new_tokens, next_mode="fraction")

    def _median_digit(self, logp_row, end_logmass: Optional[float]) -> Optional[int]:
        """The median digit token of one position in value order (`_fraction_order`), with "the number ends
        here" first when `end_logmass` is given (None when that is the median)."""
        digits = logp_row[self.tokens.digit_cols][self._fraction_order]
        logmass = digits if end_logmass is None else np.concatenate([[end_logmass], digits])
        choice = weighted_median(list(range(len(logmass))), np.exp(logmass - logmass.max()).tolist())
        if end_logmass is not None:
            if choice == 0:
                return None
            choice -= 1
        return int(self._digit_ids[self._fraction_order[choice]])


class _Actions:
    """What each cache row does in the next step, filled prompt by prompt."""

    def __init__(self, parents, tokens, feed, keep_before, slots):
        self.parents, self.tokens, self.feed, self.keep_before, self.slots = parents, tokens, feed, keep_before, slots

    def set(self, b: int, slot: int, *, parent_slot: int, token: int) -> None:
        row = b * self.slots + slot
        self.parents[row] = b * self.slots + parent_slot
        self.tokens[row] = token
        self.feed[row] = 1

    def follow_slot0(self, b: int, token: int, keep_before: Optional[int] = None) -> None:
        """Every row of prompt b reads `token`, keeping its own cache: outside numbers the K rows are copies,
        and after a number's enumeration the rewind (keep_before) leaves each row the same valid slots."""
        rows = slice(b * self.slots, (b + 1) * self.slots)
        self.tokens[rows] = token
        self.feed[rows] = 1
        if keep_before is not None:
            self.keep_before[rows] = keep_before


def number_tokens_for_tokenizer(tokenizer, vocab_size: int) -> NumberTokens:
    """NumberTokens for an `omnimol_jax.data.tokenizer.ChatTokenizer` over a model vocabulary of `vocab_size`."""
    from omnimol_jax.inference.selfies_constraint import tokenizer_token_texts

    return NumberTokens.from_texts(tokenizer_token_texts(tokenizer, vocab_size))


def decoding_memory_budget(fraction: float = 0.2) -> int:
    """Bytes a decoding cache may take: `fraction` of the accelerator's memory, or of the host's on CPU (the median
    decoder also gathers a second copy of its cache each step)."""
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        return int(fraction * stats["bytes_limit"])
    return int(fraction * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))

"""Median decoding of numbers: the ordering and median helpers on hand-computed cases, the integer-part
enumeration against brute-force probabilities from full forwards (no cache) of a tiny random Llama, the
text around numbers against step-by-step argmax, and the spread of pruned prefixes over lengths."""
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from omnimol_jax.config import model_config_from_preset
from omnimol_jax.inference import GenerationConfig, Generator
from omnimol_jax.inference.number_median import (
    NumberMedianDecoder,
    NumberTokens,
    _NumberSearch,
    _Row,
    integer_key,
    weighted_median,
)
from omnimol_jax.model.llama import LlamaForCausalLM

CONFIG = model_config_from_preset("tiny", initializer_range=0.3)  # peaked distributions, varied argmax
PAD, STOP = 0, 2
REFERENCE_LEN = 48


@pytest.fixture(scope="module")
def model():
    return LlamaForCausalLM(CONFIG, rngs=nnx.Rngs(7))


@pytest.fixture(scope="module")
def generator(model):
    return Generator(model, pad_token_id=PAD, stop_token_ids=[STOP])


@jax.jit
def _padded_logits(model, ids, mask):
    return model(ids, attention_mask=mask).logits[0].astype(jnp.float32)


def _next_log_probs(model, seq) -> np.ndarray:
    """log p(next token | seq) from a full forward without a cache."""
    ids = np.zeros((1, REFERENCE_LEN), np.int32)
    ids[0, :len(seq)] = seq
    mask = (np.arange(REFERENCE_LEN) < len(seq)).astype(np.int32)[None]
    return np.array(jax.nn.log_softmax(_padded_logits(model, ids, mask)[len(seq) - 1]))


def _texts(digits: dict[int, str]) -> list:
    """Every id reads " x" (a word: no number may follow it), except the given digit ids; specials None."""
    texts = [" x"] * CONFIG.vocab_size
    texts[PAD] = texts[STOP] = None
    for token_id, text in digits.items():
        texts[token_id] = text
    return texts


# ---------------------------------------------------------------------------------------------- helpers


def test_integer_key_orders_integer_parts_by_value_with_their_sign():
    parts = ["12", "-0", "3", "-12", "0", " 7", "-3", "007"]
    assert sorted(parts, key=integer_key) == ["-12", "-3", "-0", "0", "3", " 7", "007", "12"]
    assert integer_key("-0") < 0 < integer_key("0")  # -0.x and 0.x are different answers
    with pytest.raises(ValueError, match="not an integer part"):
        integer_key("-")


def test_weighted_median_hand_cases():
    # key order: 1 (0.5), 2 (0.3), 3 (0.2): half the mass is reached at key 1
    assert weighted_median([3.0, 1.0, 2.0], [0.2, 0.5, 0.3]) == 1
    # key order: 1 (0.4), 2 (0.1), 3 (0.5): 0.4, 0.5 -> key 2
    assert weighted_median([1.0, 2.0, 3.0], [0.4, 0.1, 0.5]) == 1
    # unnormalised weights: the same choice
    assert weighted_median([1.0, 2.0, 3.0], [4.0, 1.0, 5.0]) == 1
    # the mode is not the median: key 10 holds 0.45, the rest lies above it
    assert weighted_median([10.0, 40.0, 50.0, 60.0], [0.45, 0.2, 0.2, 0.15]) == 1
    with pytest.raises(ValueError):
        weighted_median([1.0], [0.0])


def test_number_tokens_classify_by_decoded_text():
    texts = [None, "7", " 4", "-", " -", "-3", "046", ".", " x", "4x", "..", "", " "]
    tokens = NumberTokens.from_texts(texts)
    table = tokens.table_ids.tolist()
    assert sorted(table[c] for c in tokens.digit_cols) == [1, 6]
    assert sorted(table[c] for c in tokens.start_cols) == [1, 2, 3, 4, 5, 6]
    assert [table[c] for c in tokens.point_cols] == [7]
    assert tokens.digit_mask.nonzero()[0].tolist() == [1, 6]
    with pytest.raises(ValueError, match="no digit tokens"):
        NumberTokens.from_texts([None, " x", "."])


# ---------------------------------------------------------------------------------------------- decoding


def test_without_numbers_the_answer_is_greedy(model, generator):
    """Digit texts on ids that greedy never emits: no number starts, and the K cache rows per prompt that
    follow row 0 give exactly the greedy tokens (prefill tiling and per-step gathers keep the context)."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, CONFIG.vocab_size, n).tolist() for n in (5, 9, 3)]
    greedy = generator.generate(prompts, GenerationConfig(max_new_tokens=10))
    emitted = set(greedy.tokens.ravel().tolist())
    unused = [i for i in range(3, CONFIG.vocab_size) if i not in emitted][:3]
    digits = NumberTokens.from_texts(_texts({i: str(d) for d, i in enumerate(unused)}))
    decoder = NumberMedianDecoder(generator, digits, slots=4)
    answers = decoder.generate(prompts, max_new_tokens=10, rows=4)
    for row, answer in enumerate(answers):
        assert answer.ids == greedy.answer_ids(row), row
        assert answer.finished == bool(greedy.finished[row, 0]) and answer.numbers == []


def test_integer_part_is_the_median_of_the_brute_force_distribution(model, generator):
    """The three most likely first tokens read "1", "2", "3"; with no pruning and room for every prefix of up to
    three tokens, the probabilities found equal the products of full-forward probabilities (renormalised over
    the start tokens, times the probability that no digit follows), the integer part answered is their weighted
    median, and after it (rewound cache, chosen tokens fed back) the text is the argmax of full forwards."""
    prompt = [5, 17, 33, 9, 41]
    first = _next_log_probs(model, prompt)
    digit_ids = np.argsort(-first[3:])[:3] + 3
    texts = _texts({int(i): str(d + 1) for d, i in enumerate(digit_ids)})
    decoder = NumberMedianDecoder(generator, NumberTokens.from_texts(texts), slots=27, prune=0.0,
                                  max_integer_tokens=3)
    [answer] = decoder.generate([prompt], max_new_tokens=12)

    start_norm = np.logaddexp.reduce(first[digit_ids])
    brute = {}
    for length in (1, 2, 3):
        for seq in itertools.product(digit_ids.tolist(), repeat=length):
            logp = first[seq[0]] - start_norm
            for i in range(1, length):
                logp += _next_log_probs(model, prompt + list(seq[:i]))[seq[i]]
            after = np.exp(_next_log_probs(model, prompt + list(seq))[digit_ids])
            brute[seq] = math.exp(logp) * (1.0 - after.sum())
    keys = list(brute)
    text_of = {seq: "".join(texts[i] for i in seq) for seq in keys}
    expected = keys[weighted_median([integer_key(text_of[s]) for s in keys], [brute[s] for s in keys])]

    [number] = answer.numbers
    assert number["integer"] == text_of[expected]
    assert answer.ids[:len(expected)] == list(expected)
    assert number["found_mass"] == pytest.approx(sum(brute.values()), rel=1e-4)
    top = sorted(keys, key=lambda s: -brute[s])[:5]
    assert [c[0] for c in number["candidates"]] == [text_of[s] for s in top]
    np.testing.assert_allclose([c[1] for c in number["candidates"]], [brute[s] for s in top], rtol=1e-4,
                               atol=1e-6)  # 6 decimals

    # The rest: the best non-digit token, then plain argmax, from full forwards over the chosen number.
    seq = prompt + list(expected)
    logp = _next_log_probs(model, seq)
    logp[digit_ids] = -np.inf
    reference = [int(np.argmax(logp))]
    while reference[-1] != STOP and len(expected) + len(reference) < 12:
        reference.append(int(np.argmax(_next_log_probs(model, seq + reference))))
    finished = reference[-1] == STOP
    assert answer.ids[len(expected):] == (reference[:-1] if finished else reference)
    assert answer.finished == finished


def test_pruned_prefixes_are_spread_over_lengths_and_can_hold_the_median(generator):
    """A pruned prefix's mass ends at its length at its siblings' rate, the rest one token longer (value: the
    middle of its block). Found: "5" with 0.3. Pruned: "1" with 0.6, of which siblings ended 1/3 -> 0.2 at
    1.5 and 0.4 at 15: the median (cumulative 0.2, 0.5, 0.9 of 0.9) is 5. With siblings that never ended,
    0.6 sits at 15 and the median is "1" followed by one digit chosen later."""
    texts = _texts({10: "1", 11: "5"})
    decoder = NumberMedianDecoder(generator, NumberTokens.from_texts(texts), slots=2)

    def choose(rate):
        state = _Row(live=True)
        state.number = _NumberSearch(number_at=0, outcomes=[(integer_key("5"), 0.3, [11], 0)],
                                     pruned=[(math.log(0.6), [10], rate, 1)], end_rates=[0.5, 1.0])
        decoder._choose_integer(state)
        return state.replay, state.forced_digits, state.numbers[-1]

    replay, forced, number = choose(1 / 3)
    assert (replay, forced, number["integer"]) == ([11], 0, "5")
    assert number["found_mass"] == pytest.approx(0.3) and number["candidates"] == [["5", 0.3]]
    replay, forced, number = choose(0.0)
    assert (replay, forced, number["integer"]) == ([10], 1, "1?")


def test_pruned_decoding_still_answers_a_number(model, generator):
    """Few rows and real pruning: the decoder answers an integer part made of digit tokens that the found
    and pruned mass put at the median, and never feeds a row nothing (that would corrupt its logits)."""
    prompt = [8, 21, 13]
    first = _next_log_probs(model, prompt)
    digit_ids = np.argsort(-first[3:])[:4] + 3
    texts = _texts({int(i): str(d) for d, i in enumerate(digit_ids)})
    decoder = NumberMedianDecoder(generator, NumberTokens.from_texts(texts), slots=2, prune=1e-2,
                                  max_integer_tokens=4)
    [answer] = decoder.generate([prompt], max_new_tokens=12)
    [number] = answer.numbers
    integer = number["integer"].rstrip("?")
    assert integer and integer.isdigit()
    assert 0 < number["found_mass"] < 1
    digits = "".join(texts[i] for i in answer.ids[:len(number["integer"])])
    assert digits.startswith(integer) and digits.isdigit()


def test_a_call_takes_as_many_prompts_as_their_cache_rows_fit(generator):
    """The eval splits median batches by memory (a 30-layer model's 24 x 16 cache rows did not fit 24 GB)."""
    from omnimol_jax.model.kv_cache import init_kv_cache, kv_cache_bytes

    digits = NumberTokens.from_texts(_texts({i: str(i) for i in range(10)}))
    decoder = NumberMedianDecoder(generator, digits, slots=4)
    config = generator.config
    cache = init_kv_cache(config, 4, decoder.cache_length(32, 16))
    per_prompt = sum(x.nbytes for x in cache.keys + cache.values)
    assert kv_cache_bytes(config, 4, decoder.cache_length(32, 16)) == per_prompt
    assert decoder.max_prompts(32, 16, budget_bytes=10 * per_prompt + 1) == 10
    assert decoder.max_prompts(32, 16, budget_bytes=per_prompt // 2) == 1  # never zero

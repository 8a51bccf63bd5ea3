"""Text metrics (an adapter over nltk, rouge-score and rapidfuzz): hand-computed cases, METEOR with WordNet
3.0 against NLTK's, and the public recipe run with the libraries."""
import math
import random
import sys

import pytest

from omnimol_jax.eval.metrics import compute_task_metrics
from omnimol_jax.eval.text_metrics import (
    BLEU2_WEIGHTS,
    BLEU4_WEIGHTS,
    EmptyWordNet,
    corpus_bleu,
    levenshtein_distance,
    meteor_score,
    normalized_levenshtein_similarity,
    rouge_scores,
    sentence_bleu,
)
from omnimol_jax.eval.wordnet import load_wordnet

MIN = sys.float_info.min
CAT = "the cat sat on the mat".split()
CAT_IS = "the cat is on the mat".split()
CAT_RED = "the cat sat on the red mat".split()


# ---------------------------------------------------------------- Levenshtein


def _dp_levenshtein(a, b):
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


@pytest.mark.parametrize("a, b, distance", [
    ("kitten", "sitting", 3), ("flaw", "lawn", 2), ("", "abc", 3), ("abc", "", 3), ("", "", 0),
    ("C[C@@H](N)C(=O)O", "C[C@H](N)C(=O)O", 1), ("CCO", "OCC", 2),
    (["a", "b", "c"], ["a", "c"], 1), (["add", "water"], ["add", "ice", "water"], 1),
])
def test_levenshtein_hand_cases(a, b, distance):
    assert levenshtein_distance(a, b) == distance
    assert levenshtein_distance(b, a) == distance


def test_levenshtein_equals_dynamic_programming():
    rng = random.Random(0)
    for _ in range(300):
        alphabet = "ab" if rng.random() < 0.5 else "abcdefgh"
        a = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 150)))
        b = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 150)))
        assert levenshtein_distance(a, b) == _dp_levenshtein(a, b)


def test_normalized_levenshtein_similarity():
    assert normalized_levenshtein_similarity("kitten", "sitting") == pytest.approx(1 - 3 / 7)
    assert normalized_levenshtein_similarity("", "") == 1.0
    assert normalized_levenshtein_similarity("", "ab") == 0.0
    assert normalized_levenshtein_similarity("abcd", "abcd") == 1.0


# ---------------------------------------------------------------- BLEU (hand)


def test_bleu_equal_length_with_a_missing_order():
    # unigrams 5/6, bigrams 3/5, trigrams 1/4, 4-grams 0/3 -> NLTK uses the smallest float for p4
    assert sentence_bleu([CAT_IS], CAT, BLEU2_WEIGHTS) == pytest.approx(math.sqrt(5 / 6 * 3 / 5))
    expected = math.exp(0.25 * (math.log(5 / 6) + math.log(3 / 5) + math.log(1 / 4) + math.log(MIN)))
    assert sentence_bleu([CAT_IS], CAT, BLEU4_WEIGHTS) == pytest.approx(expected, rel=1e-12, abs=0)
    assert 0 < expected < 1e-70


def test_bleu_brevity_penalty():
    # hyp 6 tokens vs ref 7: p = 6/6, 4/5, 3/4, 2/3; BP = exp(1 - 7/6)
    assert sentence_bleu([CAT_RED], CAT) == pytest.approx(math.exp(-1 / 6) * (4 / 5 * 3 / 4 * 2 / 3) ** 0.25)
    assert sentence_bleu([CAT_RED], CAT, BLEU2_WEIGHTS) == pytest.approx(math.exp(-1 / 6) * math.sqrt(4 / 5))


def test_corpus_bleu_micro_averages_and_short_hypothesis_quirk():
    # record 2: hyp ['a','b'] vs ref a b c d: p1 2/2, p2 1/1. Totals p1 8/8, p2 5/6; lengths 8 vs 11
    two = corpus_bleu([[CAT_RED], [list("abcd")]], [CAT, ["a", "b"]], BLEU2_WEIGHTS)
    assert two == pytest.approx(math.exp(1 - 11 / 8) * math.sqrt(5 / 6))
    # a 1-token hypothesis has no bigram, but NLTK still adds max(1, 0) = 1 to the bigram denominator:
    # p1 = 7/7, p2 = 4/6, lengths 7 vs 9
    quirk = corpus_bleu([[CAT_RED], [["a", "b"]]], [CAT, ["a"]], BLEU2_WEIGHTS)
    assert quirk == pytest.approx(math.exp(1 - 9 / 7) * math.sqrt(4 / 6))


def test_bleu_closest_reference_length_ties_go_to_shorter():
    # hyp of 5 tokens, references of 4 and 6 tokens: both 1 away -> r = 4 -> BP = 1
    hyp = list("abcde")
    assert sentence_bleu([list("abcd"), list("abcdef")], hyp, (1.0,)) == pytest.approx(1.0)
    # with references 6 and 7 the closest is 6 -> BP = exp(1 - 6/5)
    assert sentence_bleu([list("abcdef"), list("abcdefg")], hyp, (1.0,)) == pytest.approx(math.exp(1 - 6 / 5))


def test_bleu_no_unigram_match_and_empty_hypothesis_are_zero():
    assert sentence_bleu([CAT], ["dog"]) == 0.0
    assert sentence_bleu([CAT], []) == 0.0


# ---------------------------------------------------------------- Porter / METEOR / ROUGE (hand)


def test_meteor_hand_case_with_stem_match_and_greedy_alignment():
    hyp = ["the", "cats", "sat", "on", "mat"]
    ref = ["the", "cat", "sat", "on", "the", "mat"]
    # exact (from the last hyp word, each taking the LAST free equal ref word): mat-5, on-3, sat-2, the-4;
    # stem: cats~cat -> (1,1). Matches (0,4)(1,1)(2,2)(3,3)(4,5): 3 chunks. P = 1, R = 5/6,
    # Fmean = PR / (0.9P + 0.1R) = 50/59, penalty = 0.5 * (3/5)^3 = 0.108
    assert meteor_score([ref], hyp, wordnet=EmptyWordNet()) == pytest.approx((1 - 0.108) * 50 / 59)


def test_meteor_synonym_stage_with_wordnet_3_0():
    wordnet = load_wordnet()
    assert wordnet.get_version() == "3.0"
    # the case: without synonyms 4 of 5 pieces match (P = R = 4/5, one chunk: penalty 0.5 * (1/4)^3);
    # with WordNet big ~ great: 5 of 5 in one chunk, penalty 0.5 * (1/5)^3
    target, answer = "Great rings are common .".split(), "Big rings are common .".split()
    assert meteor_score([target], answer, wordnet=EmptyWordNet()) == pytest.approx(0.8 * (1 - 0.5 / 4 ** 3))
    assert meteor_score([target], answer) == pytest.approx(1 - 0.5 / 125) == pytest.approx(0.996)
    assert meteor_score([["a"]], [], wordnet=EmptyWordNet()) == 0.0
    assert meteor_score([["x"], CAT], CAT) == pytest.approx(1 - 0.5 / 6 ** 3)
    with pytest.raises(TypeError):
        meteor_score(["the cat"], "the cat")


def test_rouge_hand_cases():
    scores = rouge_scores("The cat sat on the mat.", "the cat is on the mat")
    assert scores["rouge1"] == pytest.approx(5 / 6)
    assert scores["rouge2"] == pytest.approx(3 / 5)
    assert scores["rougeL"] == pytest.approx(5 / 6)
    scores = rouge_scores("the cat sat on the red mat", "the cat sat on the mat")
    assert scores == pytest.approx({"rouge1": 12 / 13, "rouge2": 8 / 11, "rougeL": 12 / 13})
    assert rouge_scores("a dog", "") == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    # the default tokenizer: lower case, non-[a-z0-9] splits ('Émile' -> 'mile'); LCS of 'b d c a b a' in
    # 'a b c b d a b' is 4: precision 4/6 (answer), recall 4/7 (target)
    assert rouge_scores("Benzene-ring, C6H6! Émile", "benzene ring c6h6 mile")["rouge1"] == pytest.approx(1.0)
    precision, recall = 4 / 6, 4 / 7
    assert rouge_scores("a b c b d a b", "b d c a b a")["rougeL"] == pytest.approx(2 * precision * recall /
                                                                                    (precision + recall))


# ---------------------------------------------------------------- task level (hand)


def test_caption_metrics_hand_computed():
    preds = ["the cat sat on the mat", ""]
    refs = ["the cat sat on the red mat", "a dog"]
    # BLEU totals: p1 = 6/(6+1), p2 = 4/(5+1), p3 = 3/(4+1), p4 = 2/(3+1) (the empty hypothesis adds 1 to
    # every denominator); lengths 6 vs 9 -> BP = exp(-1/2)
    # METEOR record 1: matches 0-0 .. 4-4, 5-6 -> 2 chunks; P = 1, R = 6/7 -> (1 - 0.5/27) * 60/69; record 2: 0
    for protocol in ("reference", "strict"):
        m = compute_task_metrics("molcap", preds, refs, protocol)
        assert m["bleu2"] == pytest.approx(math.exp(-0.5) * math.sqrt(6 / 7 * 4 / 6))
        assert m["bleu4"] == pytest.approx(math.exp(-0.5) * (6 / 7 * 4 / 6 * 3 / 5 * 2 / 4) ** 0.25)
        assert m["meteor"] == pytest.approx((53 / 54) * (60 / 69) / 2)
        assert m["rouge1"] == pytest.approx(6 / 13) and m["rougeL"] == pytest.approx(6 / 13)
        assert m["rouge2"] == pytest.approx(4 / 11)
        assert (m["n"], m["n_valid"], m["n_failed"]) == (2, 1, 1)


def test_procedure_levenshtein_shares_hand_computed():
    preds = ["the cat sat on the mat", "", "stir"]
    refs = ["the cat sat on the red mat", "a dog", "stir"]
    # similarities: 1 - 4/26 = 0.846, 0, 1
    m = compute_task_metrics("experiment", preds, refs, "strict")
    assert m["lev_ge_1.0"] == pytest.approx(1 / 3) and m["lev_ge_0.9"] == pytest.approx(1 / 3)
    assert m["lev_ge_0.75"] == pytest.approx(2 / 3) and m["lev_ge_0.5"] == pytest.approx(2 / 3)


def test_reference_protocol_truncates_to_512_pieces_and_tokenize_fn_is_used():
    pred, ref = "a " * 600, "a " * 600 + "b"
    assert compute_task_metrics("dqa", [pred], [ref], "reference")["bleu4"] == pytest.approx(1.0)
    # strict keeps all 601 reference pieces: every n-gram matches, BP = exp(1 - 601/600)
    assert compute_task_metrics("dqa", [pred], [ref], "strict")["bleu4"] == pytest.approx(math.exp(-1 / 600))
    # one piece per text: no bigram, so NLTK's smallest-float p2 -> sqrt(MIN); per character: perfect
    assert compute_task_metrics("dqa", ["ab"], ["ab"], "strict")["bleu2"] == pytest.approx(math.sqrt(MIN), rel=1e-12,
                                                                                           abs=0)
    assert compute_task_metrics("dqa", ["ab"], ["ab"], "strict", tokenize_fn=list)["bleu2"] == pytest.approx(1.0)


def test_text_metrics_reject_non_strings_naming_the_record():
    with pytest.raises(TypeError, match=r"record r7 \(task molcap\)"):
        compute_task_metrics("molcap", ["ok", None], ["a", "b"], record_ids=["r6", "r7"])


# ---------------------------------------------------------------- against NLTK / rouge-score

SAMPLE_REFERENCES = [
    "The molecule is a monocarboxylic acid anion that is the conjugate base of lactic acid.",
    "It is an amino acid, a tetrapeptide and a member of benzenes; it derives from L-alanine.",
    "Add water (10 mL) to $1$ and stir the mixture at room temperature for 2 h; then filter.",
    "The molecule is a steroid ester.",
    "a b c d e f",
    "word",
]
SAMPLE_PREDICTIONS = [
    "The molecule is a carboxylic acid anion which is the conjugate base of lactic acids.",
    "It is a tetrapeptide and an amino acid; it derives from D-alanine and benzene.",
    "Add water to $1$, stir at room temperature for 2 h and filter the mixtures.",
    "The molecules are steroids",
    "a b",
    "",
]
CAPTION_REFERENCES = [
    "Great rings are common in natural products.",
    "The compound is a potent inhibitor of the enzyme.",
    "It has a role as a plant metabolite and an antibacterial agent.",
    "The molecule is a large aromatic hydrocarbon.",
    "It is a colorless liquid with a sweet odor.",
    "This acid is found in sour milk.",
    "A small molecule that binds the receptor strongly.",
]
CAPTION_PREDICTIONS = [
    "Big rings are usual in natural products.",
    "The compound is a strong inhibitor of the enzyme.",
    "It has a function as a plant metabolite and an antibiotic agent.",
    "The molecule is a big aromatic hydrocarbon.",
    "It is a colourless liquid with a sweet smell.",
    "This acid is present in sour milk.",
    "A little molecule which binds the receptor firmly.",
]


def test_caption_task_metrics_match_the_public_recipe_with_wordnet():
    """The public calc_mocap_metrics recipe run with the real libraries and NLTK's own WordNet loader (on the
    prepared WordNet 3.0), on a dozen caption pairs: every per-pair METEOR, the corpus BLEU and the ROUGE means."""
    import nltk.translate.bleu_score as bleu
    import nltk.translate.meteor_score as meteor
    from nltk.corpus import wordnet as nltk_wordnet
    from rouge_score.rouge_scorer import RougeScorer

    load_wordnet()  # puts the prepared copy on nltk.data.path
    references = SAMPLE_REFERENCES + CAPTION_REFERENCES
    predictions = SAMPLE_PREDICTIONS + CAPTION_PREDICTIONS
    assert len(references) == len(predictions) >= 12
    scorer = RougeScorer(["rouge1", "rouge2", "rougeL"])
    out = [p.split() for p in predictions]
    gt = [[r.split()] for r in references]
    meteors = [meteor.meteor_score(g, o, wordnet=nltk_wordnet) for g, o in zip(gt, out)]
    rouge = [scorer.score(r, p) for r, p in zip(references, predictions)]
    expected = {
        "bleu2": bleu.corpus_bleu(gt, out, weights=[0.5, 0.5]),
        "bleu4": bleu.corpus_bleu(gt, out, weights=(0.25, 0.25, 0.25, 0.25)),
        "meteor": sum(meteors) / len(out),
        **{k: sum(r[k].fmeasure for r in rouge) / len(rouge) for k in ("rouge1", "rouge2", "rougeL")},
    }
    for i, (reference, prediction) in enumerate(zip(references, predictions)):
        got = compute_task_metrics("molcap", [prediction], [reference], "reference")["meteor"]
        assert got == pytest.approx(meteors[i], rel=1e-12), (reference, prediction)
    # synonyms count: several pairs score higher with WordNet than without it
    without = [meteor.meteor_score(g, o, wordnet=EmptyWordNet()) for g, o in zip(gt, out)]
    assert sum(m > w + 1e-9 for m, w in zip(meteors, without)) >= 3
    got = compute_task_metrics("molcap", predictions, references, "reference")
    assert {k: got[k] for k in expected} == pytest.approx(expected, rel=1e-12)

"""How the two protocols read answers (docs/omnimol.md §9): hand-made raw answers that end in `<|eot_id|>\\n`, hold
`<|end_of_text|>` or start with a space, scored as the public code's conventions give (values worked out by hand
below), against the strict protocol's clean answers. Also the report's header and the records' raw form."""
import json

import pytest

from omnimol_jax.eval.answers import (
    conventions as protocol_conventions,
    record_answers,
    reference_answer,
    split_special_tokens,
)
from omnimol_jax.eval.metrics import compute_metrics_from_records
from omnimol_jax.eval.report import write_report


def _records(rows):
    return [{"id": str(i), "raw": raw, "prediction": clean, "reference": ref, **extra}
            for i, (raw, clean, ref, extra) in enumerate(rows)]


def test_reference_answer_cuts_molecules_and_numbers_at_the_first_eot_without_stripping():
    assert reference_answer("forward", "[C][C][O]<|eot_id|>\n") == "[C][C][O]"
    assert reference_answer("forward", " [C]<|eot_id|>[O]<|eot_id|>") == " [C]"
    assert reference_answer("logp", "[O]<|end_of_text|>") == "[O]<|end_of_text|>"
    assert reference_answer("molcap", "An acid.<|eot_id|>") == "An acid.<|eot_id|>"  # text: raw as it is
    assert split_special_tokens("An acid.<|eot_id|><|end_of_text|> x") == ["An", "acid.", "<|eot_id|>",
                                                                          "<|end_of_text|>", "x"]
    records = [{"prediction": "a", "raw": "a<|eot_id|>"}, {"prediction": "b"}]
    assert record_answers(records, "reference") == (["a<|eot_id|>", "b"], 1)
    assert record_answers(records, "strict") == (["a", "b"], 0)


def test_molecule_answers():
    records = _records([
        ("[C][C][O]<|eot_id|>\n", "[C][C][O]", "[C][C][O]", {}),  # cut at eot: valid, exact
        (" [C][=O]<|eot_id|>", "[C][=O]", "[C][=O]", {}),  # leading space kept; selfies ignores it: valid
        ("[O]<|end_of_text|>", "[O]", "[O]", {}),  # stopped by end_of_text: the token stays, decoding fails
        ("[N]\n<|eot_id|>", "[N]", "[N]", {}),  # a newline before eot stays: decoding fails
    ])
    got = compute_metrics_from_records("forward", records)
    reference, strict = got["reference"], got["strict"]
    assert (reference["n"], reference["n_valid"], reference["n_failed"]) == (4, 2, 2)
    assert reference["validity"] == 0.5 and reference["exact_match"] == 1.0 and reference["levenshtein"] == 0.0
    # SELFIES characters of the two valid answers: ' [C][=O]' vs '[C][=O]' adds one unmatched character per
    # order: p1 = 16/17, p2 = 14/15, p3 = 12/13, p4 = 10/11, lengths 17 vs 16 (no brevity penalty)
    assert reference["bleu"] == pytest.approx((16 / 17 * 14 / 15 * 12 / 13 * 10 / 11) ** 0.25)
    assert strict["validity"] == 1.0 and strict["exact_match"] == 1.0
    # all four clean answers equal their targets, but the two 3-character ones have no 4-gram, and NLTK still
    # counts max(1, 0) = 1 in that order's denominator: p4 = (6 + 4) / (6 + 4 + 1 + 1)
    assert strict["bleu"] == pytest.approx((10 / 12) ** 0.25)


def test_number_answers():
    weight = compute_metrics_from_records("weight", _records([
        (" 180.16 g/mol<|eot_id|>", "180.16 g/mol", "The molecular weight is 180.16.", {}),
        ("about -3<|end_of_text|>", "about -3", "5", {}),  # public regex drops the sign: 3 vs 5
    ]))
    assert weight["reference"]["mae"] == pytest.approx((0 + 2) / 2)
    assert weight["strict"]["mae"] == pytest.approx((0 + 8) / 2)
    homo = "What is the HOMO energy of this molecule?"
    homolumo = compute_metrics_from_records("homolumo", _records([
        ("-0.25<|eot_id|>\n", "-0.25", "-0.20", {"instruction": homo}),  # float() strips the newline
        ("-0.30<|end_of_text|>", "-0.30", "-0.40", {"instruction": homo}),  # float() fails: skipped
    ]))
    assert homolumo["reference"]["mae_homo"] == pytest.approx(0.05) and homolumo["reference"]["n_failed"] == 1
    assert homolumo["strict"]["mae_homo"] == pytest.approx((0.05 + 0.10) / 2) and homolumo["strict"]["n_failed"] == 0


def test_text_answers_keep_the_eot_for_rouge_and_drop_it_for_bleu_and_meteor():
    got = compute_metrics_from_records("molcap", _records([
        ("The molecule is an acid.<|eot_id|>", "The molecule is an acid.", "The molecule is an acid.", {})]))
    reference, strict = got["reference"], got["strict"]
    # ROUGE tokens: target [the molecule is an acid], answer + [eot id]: unigrams P = 5/7, R = 1; bigrams P = 4/6
    assert reference["rouge1"] == pytest.approx(2 * 5 / 7 / (5 / 7 + 1)) == reference["rougeL"]
    assert reference["rouge2"] == pytest.approx(2 * 4 / 6 / (4 / 6 + 1))
    # BLEU / METEOR pieces: <|eot_id|> dropped, so the answer equals the target
    assert reference["bleu4"] == pytest.approx(1.0) and reference["meteor"] == pytest.approx(1 - 0.5 / 5 ** 3)
    assert strict["rouge1"] == pytest.approx(1.0) and strict["bleu4"] == pytest.approx(1.0)
    # <|end_of_text|> is neither dropped nor cut: it is a BLEU piece and the ROUGE words 'end of text'
    other = compute_metrics_from_records("molcap", _records([
        ("An acid.<|end_of_text|>", "An acid.", "An acid.", {})]), protocols=("reference",))["reference"]
    assert other["rouge1"] == pytest.approx(2 * 2 / 5 / (2 / 5 + 1))
    assert other["bleu2"] == pytest.approx((2 / 3 * 1 / 2) ** 0.5 * 1.0)  # p1 2/3, p2 1/2, BP 1 (3 vs 2 pieces)


def test_the_report_states_each_convention(tmp_path):
    results = compute_metrics_from_records("molcap", _records([("An acid.<|eot_id|>", "An acid.", "An acid.", {})]))
    conventions = {"reference": protocol_conventions("reference"), "strict": protocol_conventions("strict"),
                   "METEOR": "NLTK METEOR with WordNet 3.0 synonyms (here)"}
    write_report({"molcap": results}, tmp_path, conventions)
    table = (tmp_path / "metrics.md").read_text()
    assert "- **reference**: answers decoded with special tokens kept" in table
    assert "- **strict**: answers decoded without special tokens" in table
    assert "- **METEOR**: NLTK METEOR with WordNet 3.0" in table
    assert json.loads((tmp_path / "metrics" / "molcap.json").read_text())["conventions"] == conventions
    assert "ROUGE sees 'eot id'" in conventions["reference"]
    assert "read the text before the first `<|im_end|>`" in protocol_conventions("reference", "<|im_end|>")
    assert "ROUGE sees 'im end'" in protocol_conventions("reference", "<|im_end|>")


def test_a_chatml_model_is_read_at_its_own_end_of_turn():
    """The reference protocol cuts at the model tokenizer's end-of-turn token (`<|im_end|>` for SmolLM2's ChatML):
    the same scores as a Llama-3 model whose answers end in `<|eot_id|>`."""
    assert reference_answer("forward", "[C][C][O]<|im_end|>\n", "<|im_end|>") == "[C][C][O]"
    assert reference_answer("forward", "[C][C][O]<|im_end|>\n") == "[C][C][O]<|im_end|>\n"  # not Llama 3's token
    for task, answer, reference in (("forward", "[C][C][O]", "[C][C][O]"),
                                    ("molcap", "An acid found in milk.", "It is an acid found in milk."),
                                    ("weight", "46.07", "The molecular weight is 46.07 g/mol.")):
        llama3 = compute_metrics_from_records(task, _records([(answer + "<|eot_id|>", answer, reference, {})]))
        chatml = compute_metrics_from_records(task, _records([(answer + "<|im_end|>", answer, reference, {})]),
                                              end_of_turn="<|im_end|>")
        assert chatml == llama3, task

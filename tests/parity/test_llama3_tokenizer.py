"""The real Llama-3 tokenizer, built offline by `omnimol build-tokenizer --llama3` from the tiktoken file of the
llama-models wheel (a test dependency): known ids, the special tokens of Llama 3.2, transformers reading the
folder, and the chat format with its labels against transformers' own rendering of the chat template."""
import numpy as np
import pytest

from omnimol_jax.cli import main as cli_main
from omnimol_jax.constants import IGNORE_INDEX
from omnimol_jax.data.tokenizer import load_chat_tokenizer
from omnimol_jax.tasks import SYSTEM_PROMPT


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    out = tmp_path_factory.mktemp("llama3") / "tokenizer"
    assert cli_main(["build-tokenizer", "--llama3", "--out", str(out)]) == 0
    return out


def test_known_ids_and_the_special_tokens_of_llama_3_2(llama3):
    tokenizer = load_chat_tokenizer(llama3)
    assert tokenizer.encode("Hello world") == [9906, 1917]
    assert tokenizer.encode("\n\n\n") == [1432] and tokenizer.encode("\n\n") == [271]
    assert tokenizer.vocab_size == 128_256
    ids = {name: tokenizer.tokenizer.token_to_id(name) for name in (
        "<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
        "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|reserved_special_token_247|>")}
    assert list(ids.values()) == [128000, 128001, 128004, 128006, 128007, 128008, 128009, 128255]
    assert (tokenizer.bos_id, tokenizer.end_of_turn_id, tokenizer.pad_id) == (128000, 128009, 128004)
    assert tokenizer.decode([9906, 1917]) == "Hello world"


def test_the_chat_format_with_double_bos_matches_the_chat_template_and_labels_only_the_answer(llama3):
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(str(llama3))
    assert auto("Hello world").input_ids == [128000, 9906, 1917]
    chat = load_chat_tokenizer(llama3, double_bos=True)
    question, answer = "What is the LogP of [C][C][O]?", "The LogP of this molecule is -0.00."
    encoded = chat.encode_chat(question, answer)
    text = auto.apply_chat_template([{"role": "system", "content": SYSTEM_PROMPT},
                                     {"role": "user", "content": question},
                                     {"role": "assistant", "content": answer}], tokenize=False)
    # The public code tokenizes the rendered template with special tokens on: its BOS comes in front of the
    # template's own, so the released checkpoints saw two.
    reference = auto(text).input_ids
    assert reference[:2] == [128000, 128000]
    assert encoded.input_ids.tolist() == reference
    supervised = [int(t) for t, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX]
    assert supervised == auto(answer, add_special_tokens=False).input_ids + [128009]
    assert np.array_equal(encoded.labels[encoded.labels != IGNORE_INDEX], supervised)
    single = load_chat_tokenizer(llama3, double_bos=False).encode_chat(question, answer)
    assert single.input_ids.tolist() == reference[1:]


def test_a_bad_model_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "tokenizer.model"
    bad.write_text("not base64 at all\n")
    assert cli_main(["build-tokenizer", "--llama3", "--out", str(tmp_path / "out"), "--model-file", str(bad)]) == 2
    assert f"{bad}:1: not a tiktoken line" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_leading_newline_merges_across_the_header_as_whole_string_tokenization_does(llama3):
    """The reference tokenizes the rendered conversation whole (cut only at <image>): '\\n\\n' + '\\nanswer' is one
    token 1432 ('\\n\\n\\n') after <|end_header_id|>, and it belongs to the prompt (not supervised)."""
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(str(llama3))
    chat = load_chat_tokenizer(llama3, double_bos=True)
    for user, answer in (("<image>\nWhat is it?", "\nIt is ethanol."), ("\nA text-only question?", "\n\nYes.")):
        encoded = chat.encode_chat(user, answer)
        text = auto.apply_chat_template([{"role": "system", "content": SYSTEM_PROMPT},
                                         {"role": "user", "content": user},
                                         {"role": "assistant", "content": answer}], tokenize=False)
        before, after = text.split("<image>") if "<image>" in text else (text, None)
        reference = auto(before).input_ids + ([] if after is None else [-200] + auto(after,
                                                                                   add_special_tokens=False).input_ids)
        assert encoded.input_ids.tolist() == reference
        ids = encoded.input_ids.tolist()
        header = len(ids) - 1 - ids[::-1].index(128007)  # the assistant header's end
        newlines = "\n\n" + answer[:len(answer) - len(answer.lstrip("\n"))]
        assert [ids[header + 1]] == auto(newlines, add_special_tokens=False).input_ids  # one merged token
        assert encoded.labels[header + 1] == IGNORE_INDEX  # the merged run is the prompt's
        supervised = [int(t) for t, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX]
        assert supervised == auto(answer.lstrip("\n"), add_special_tokens=False).input_ids + [128009]
    assert auto("\n\n\n", add_special_tokens=False).input_ids == [1432]
    # the text-only user turn's leading newline merges with the user header's '\n\n' too
    user_header = chat.encode_prompt("\nA text-only question?").input_ids.tolist()
    assert user_header[user_header.index(128007, 5) + 1] == 1432


def _reference_ids(auto, user: str, answer: str) -> list[int]:
    """What the public code feeds the model: the rendered chat template cut at <image> (-200 in its place), the
    first chunk tokenized with its BOS, the rest without."""
    text = auto.apply_chat_template([{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user},
                                     {"role": "assistant", "content": answer}], tokenize=False)
    chunks = text.split("<image>")
    ids = auto(chunks[0]).input_ids
    for chunk in chunks[1:]:
        ids += [-200] + auto(chunk, add_special_tokens=False).input_ids
    return ids


def test_one_prompt_per_task_gives_the_ids_written_down(llama3):
    """tests/parity/data/llama3_task_ids.json: the ids (and supervised ids) of each task's record in
    tests/data_records.py, written down once; they must also equal the reference rendering above."""
    import json
    from pathlib import Path

    from transformers import AutoTokenizer

    from omnimol_jax import tasks
    from omnimol_jax.data import prompts
    from tests.data_records import RECORDS

    expected = json.loads((Path(__file__).parent / "data" / "llama3_task_ids.json").read_text())
    assert set(expected) == set(RECORDS) == set(tasks.TASK_KEYS)
    auto = AutoTokenizer.from_pretrained(str(llama3))
    chat = load_chat_tokenizer(llama3, double_bos=True)
    for key, record in RECORDS.items():
        spec = tasks.get_task(key)
        user, answer = prompts.user_message(spec, record, 0), prompts.answer_text(spec, record)
        encoded = chat.encode_chat(user, answer)
        supervised = [int(t) for t, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX]
        assert encoded.input_ids.tolist() == expected[key]["input_ids"], key
        assert supervised == expected[key]["supervised"], key
        assert encoded.input_ids.tolist() == _reference_ids(auto, user, answer), key


def test_raw_answers_decode_as_the_public_codes_transformers_decodes_them(llama3):
    """The reference protocol's raw answer: special tokens kept and, as Llama 3.2's tokenizer_config asks, the
    clean-up of spaces (" ." -> ".") that transformers 4.45 (the public code's pin) applied in decode. transformers
    5 no longer cleans up BPE text, so the expected strings are written out."""
    import json

    from transformers import AutoTokenizer

    assert json.loads((llama3 / "tokenizer_config.json").read_text())["clean_up_tokenization_spaces"] is True
    chat = load_chat_tokenizer(llama3)
    assert chat.clean_up_spaces
    auto = AutoTokenizer.from_pretrained(str(llama3))
    for text, expected in (("It is an acid . It isn't basic , is it ?<|eot_id|>",
                            "It is an acid. It isn't basic, is it?<|eot_id|>"),
                           ("[C][C][O]<|eot_id|>\n", "[C][C][O]<|eot_id|>\n"),
                           (" 1.5 g/mol<|end_of_text|>", " 1.5 g/mol<|end_of_text|>")):
        ids = chat.encode(text)
        assert auto.decode(ids) == text  # the ids are the text's, special tokens included
        assert chat.decode_like_transformers(ids) == expected


def test_reference_text_metrics_on_llama3_pieces_follow_the_public_recipe(llama3):
    """`omnimol eval` scores text tasks on the tokenizer's pieces of the raw answer; the public calc_mocap_metrics
    tokenizes with transformers (pieces cut to 512; transformers 4 truncated there, 5 no longer does, so the cut is
    written out), drops the eos / pad piece `<|eot_id|>`, and runs NLTK BLEU and METEOR (WordNet 3.0) and ROUGE on
    the raw strings."""
    import nltk.translate.bleu_score as bleu
    import nltk.translate.meteor_score as meteor
    from nltk.corpus import wordnet
    from rouge_score.rouge_scorer import RougeScorer
    from transformers import AutoTokenizer

    from omnimol_jax.eval.metrics import compute_task_metrics
    from omnimol_jax.eval.wordnet import load_wordnet

    load_wordnet()
    raw = ["The molecule is a big aromatic ring.<|eot_id|>", "It is an acid found in milk.<|eot_id|>",
           " Great rings are common.<|eot_id|>\n", "A colourless liquid<|end_of_text|>", "<|eot_id|>",
           "word " * 600 + "<|eot_id|>"]
    targets = ["The molecule is a large aromatic ring.", "It is an acid present in sour milk.",
               "Big rings are common.", "A colorless liquid.", "Some text.", "word " * 520]
    auto = AutoTokenizer.from_pretrained(str(llama3))

    def public_pieces(text):
        return [p for p in auto.tokenize(text)[:512] if p != "<|eot_id|>"]

    out = [public_pieces(r) for r in raw]
    gt = [[public_pieces(t)] for t in targets]
    scorer = RougeScorer(["rouge1", "rouge2", "rougeL"])
    rouge = [scorer.score(t, r) for t, r in zip(targets, raw)]
    expected = {
        "bleu2": bleu.corpus_bleu(gt, out, weights=[0.5, 0.5]),
        "bleu4": bleu.corpus_bleu(gt, out, weights=(0.25, 0.25, 0.25, 0.25)),
        "meteor": sum(meteor.meteor_score(g, o, wordnet=wordnet) for g, o in zip(gt, out)) / len(out),
        **{k: sum(r[k].fmeasure for r in rouge) / len(rouge) for k in ("rouge1", "rouge2", "rougeL")},
    }
    chat = load_chat_tokenizer(llama3)
    got = compute_task_metrics("molcap", raw, targets, "reference",
                               tokenize_fn=lambda text: chat.tokenizer.encode(text, add_special_tokens=False).tokens)
    assert {k: got[k] for k in expected} == pytest.approx(expected, rel=1e-12)
    assert got["n_failed"] == 1  # the answer that is only <|eot_id|>

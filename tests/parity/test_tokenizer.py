"""Tokenizer: llama3 special tokens, SELFIES symbols as single tokens, HF folder, chat format and labels."""
import json
import pickle

import numpy as np
import pytest
import tokenizers

from omnimol_jax import tasks
from omnimol_jax.constants import IGNORE_INDEX, IMAGE_TOKEN_ID
from omnimol_jax.data import prompts
from omnimol_jax.data.chat_format import ChatFormatError
from omnimol_jax.data.tokenizer import (
    LLAMA3_SPECIAL_TOKENS,
    ChatTokenizer,
    TokenizerError,
    load_chat_tokenizer,
    train_bpe_tokenizer,
)
from tests.data_records import RECORDS

TEXTS = [prompts.chat_text(tasks.get_task(task), record, question_draw=0) for task, record in RECORDS.items()] * 20


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return train_bpe_tokenizer(TEXTS, tmp_path_factory.mktemp("tok") / "tokenizer", vocab_size=700)


@pytest.fixture(scope="module")
def chat(tokenizer_dir):
    return load_chat_tokenizer(tokenizer_dir)


def test_special_tokens_in_llama3_order(chat):
    for index, token in enumerate(LLAMA3_SPECIAL_TOKENS):
        assert chat.tokenizer.token_to_id(token) == index
    assert (chat.bos_id, chat.pad_id, chat.end_of_turn_id, chat.stop_ids) == (0, 4, 9, (1, 9))


def test_every_selfies_symbol_is_one_token(chat):
    text = "[C][=C][Branch1][C@@H1][N+1][O-1][Ring2][=Branch2][#C][Cl][Na+1]"
    ids = chat.encode(text)
    assert len(ids) == 11
    assert [chat.decode([i]) for i in ids] == ["[C]", "[=C]", "[Branch1]", "[C@@H1]", "[N+1]", "[O-1]", "[Ring2]",
                                              "[=Branch2]", "[#C]", "[Cl]", "[Na+1]"]
    sentence = "The compound SELFIES sequence is: [C][C][O] and ünïcode 3.14"
    assert chat.decode(chat.encode(sentence)) == sentence


def test_numbers_are_split_into_single_digits_and_round_trip(chat):
    text = "The molecular weight of this molecule is 572.56 g/mol, logP -1.234"
    ids = chat.encode(text)
    tokens = [chat.decode([i]) for i in ids]
    assert tokens[tokens.index("5"):][:6] == ["5", "7", "2", ".", "5", "6"]
    assert all(len(t) == 1 for t in tokens if any(c.isdigit() for c in t))
    assert chat.decode(ids) == text


def test_hf_folder_loads_with_autotokenizer(tokenizer_dir, chat):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    text = "Please provide the HOMO energy value for this molecule. [C][C][O]"
    assert hf(text)["input_ids"] == [chat.bos_id] + chat.encode(text)  # adds one BOS, as Llama 3's does
    assert hf.convert_tokens_to_ids(["<|eot_id|>", "<|finetune_right_pad_id|>"]) == [9, 4]
    assert hf.pad_token == "<|finetune_right_pad_id|>" and hf.bos_token == "<|begin_of_text|>"
    rendered = hf.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
                                      tokenize=False, add_generation_prompt=True)
    assert rendered == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
                        "<|start_header_id|>user<|end_header_id|>\n\nU<|eot_id|>"
                        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    meta = json.loads((tokenizer_dir / "omnimol_tokenizer.json").read_text())
    assert meta["vocab_size"] == len(hf)


def _reference_ids(chat: ChatTokenizer, text: str) -> list[int]:
    """The public code's `tokenizer_image_token`: split at <image>, encode each chunk with the tokenizer's BOS,
    keep the first chunk's BOS, drop the others', one -200 at each split."""
    chunks = [[chat.bos_id] + chat.encode(chunk) for chunk in text.split("<image>")]
    ids = [chunks[0][0]]
    for k, chunk in enumerate(chunks):
        if k:
            ids.append(IMAGE_TOKEN_ID)
        ids.extend(chunk[1:])
    return ids


@pytest.mark.parametrize("task", sorted(RECORDS))
def test_encoding_matches_whole_string_encoding_and_labels_cover_only_the_answer(chat, task):
    spec, record = tasks.get_task(task), RECORDS[task]
    answer = prompts.answer_text(spec, record)
    encoded = chat.encode_chat(prompts.user_message(spec, record), answer)
    # Same ids as the public code's whole-string tokenisation (double BOS included).
    assert encoded.input_ids.tolist() == _reference_ids(chat, prompts.chat_text(spec, record))
    assert encoded.input_ids[:2].tolist() == [chat.bos_id, chat.bos_id]
    supervised = encoded.labels != IGNORE_INDEX
    answer_ids = chat.encode(answer) + [chat.end_of_turn_id]
    assert supervised.sum() == len(answer_ids)
    assert supervised[-len(answer_ids):].all() and not supervised[:-len(answer_ids)].any()
    assert encoded.labels[supervised].tolist() == encoded.input_ids[supervised].tolist() == answer_ids
    assert chat.decode(encoded.labels[supervised]) == answer + "<|eot_id|>"
    assert (encoded.image_position >= 0) == spec.has_graph
    if spec.has_graph:
        assert encoded.input_ids[encoded.image_position] == IMAGE_TOKEN_ID
        assert chat.decode(encoded.input_ids[encoded.image_position - 4:encoded.image_position]).endswith(
            "user<|end_header_id|>\n\n")
    prompt = chat.encode_prompt(prompts.user_message(spec, record))
    assert encoded.input_ids[:len(prompt.input_ids)].tolist() == prompt.input_ids.tolist()
    assert len(prompt.input_ids) == len(encoded.input_ids) - len(answer_ids)


def test_single_bos_when_compatibility_flag_off(tokenizer_dir):
    single = load_chat_tokenizer(tokenizer_dir, double_bos=False)
    double = load_chat_tokenizer(tokenizer_dir)
    spec, record = tasks.get_task("homolumo"), RECORDS["homolumo"]
    a = single.encode_chat(prompts.user_message(spec, record), "-0.2482").input_ids
    b = double.encode_chat(prompts.user_message(spec, record), "-0.2482").input_ids
    assert a[0] == single.bos_id and a[1] != single.bos_id
    assert b.tolist() == [double.bos_id] + a.tolist()


def test_two_placeholders_are_rejected(chat):
    with pytest.raises(TokenizerError, match="one <image> placeholder"):
        chat.encode_chat("<image>\n<image>\nx", "y")


def test_pickles_for_worker_processes(chat):
    clone = pickle.loads(pickle.dumps(chat))
    assert clone.encode("[C][C] water") == chat.encode("[C][C] water")
    assert clone.end_of_turn_id == chat.end_of_turn_id and clone.frame == chat.frame


def test_loading_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_chat_tokenizer(tmp_path)
    plain = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    plain.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ChatFormatError, match=f"tokenizer {tmp_path} has no chat template"):
        load_chat_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="lacks Llama 3's special tokens"):
        load_chat_tokenizer(tmp_path, chat_format="llama3")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot load tokenizer"):
        load_chat_tokenizer(tmp_path / "broken")


def test_labels_are_int32(chat):
    encoded = chat.encode_chat("hello", "[C]")
    assert encoded.input_ids.dtype == np.int32 and encoded.labels.dtype == np.int32

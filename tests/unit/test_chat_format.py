"""Chat frames from templates (data/chat_format.py): which templates split into prompt and answer, and the errors of
those that do not. Renderers here are small Python functions standing in for Jinja templates; the real templates
(SmolLM2's ChatML through transformers, the Llama-3 folders) are checked in tests/parity."""
import pytest

from omnimol_jax.data.chat_format import LLAMA3_OMNIMOL, ChatFormatError, frame_from_template

SPECIALS = ["<|im_start|>", "<|im_end|>", "<s>", "</s>"]


def chatml(messages, add_generation_prompt):
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def llama2(messages, add_generation_prompt):  # refuses a system turn, as several Llama-2 / Mistral templates do
    if any(m["role"] == "system" for m in messages):
        raise ValueError("Conversation roles must alternate user/assistant/user/assistant/...")
    text = "<s>"
    for m in messages:
        text += f"[INST] {m['content']} [/INST]" if m["role"] == "user" else f"{m['content']}</s>"
    return text


def test_chatml_splits_into_a_frame_that_reproduces_the_template():
    frame = frame_from_template(chatml, SPECIALS, "tok/chatml")
    assert (frame.prefix, frame.after_system, frame.after_user, frame.suffix, frame.end_of_turn) == (
        "<|im_start|>system\n", "<|im_end|>\n<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n",
        "<|im_end|>\n", "<|im_end|>")
    messages = [{"role": "system", "content": " S\n"}, {"role": "user", "content": "<image>\nU "}]
    text, start, end = frame.conversation(" S\n", "<image>\nU ", " [C][O]\n")
    assert text == chatml(messages + [{"role": "assistant", "content": " [C][O]\n"}], False)
    assert text[start:end] == " [C][O]\n<|im_end|>"  # the answer and its end of turn; the template's "\n" is not
    assert frame.prompt(" S\n", "<image>\nU ") == chatml(messages, True)


def test_a_template_without_system_turns_gets_a_frame_without_one():
    frame = frame_from_template(llama2, SPECIALS, "tok/llama2")
    assert not frame.has_system and frame.end_of_turn == "</s>"
    assert frame.prompt("ignored", "U") == "<s>[INST] U [/INST]"
    assert frame.conversation("ignored", "U", "A") == ("<s>[INST] U [/INST]A</s>", 19, 24)


def test_templates_that_cannot_be_split_are_refused_naming_the_tokenizer():
    def trims(messages, add_generation_prompt):
        return chatml([{**m, "content": m["content"].strip()} for m in messages], add_generation_prompt)

    with pytest.raises(ChatFormatError, match="tokenizer tok/trim: its chat template changes the message texts"):
        frame_from_template(trims, SPECIALS, "tok/trim")

    def no_end(messages, add_generation_prompt):
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + ("assistant: " * add_generation_prompt)

    with pytest.raises(ChatFormatError, match="writes no special token right after the assistant's answer"):
        frame_from_template(no_end, SPECIALS, "tok/plain")

    def other_prompt(messages, add_generation_prompt):  # the generation prompt is not the conversation's prefix
        return chatml(messages, False) + ("<|im_start|>model\n" if add_generation_prompt else "")

    with pytest.raises(ChatFormatError, match="its generation prompt"):
        frame_from_template(other_prompt, SPECIALS, "tok/other")

    def broken(messages, add_generation_prompt):
        raise TypeError("'NoneType' object is not iterable")

    with pytest.raises(ChatFormatError, match="fails on a system/user/assistant conversation: TypeError"):
        frame_from_template(broken, SPECIALS, "tok/broken")


def test_the_llama3_omnimol_frame_is_the_public_codes_conversation():
    text, start, end = LLAMA3_OMNIMOL.conversation("SYS", "<image>\nQ", "A")
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nSYS<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\n<image>\nQ<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\nA<|eot_id|>")
    assert text[start:end] == "A<|eot_id|>" and end == len(text)
